"""Corruption error and its normaliser: CE, mCE, relative CE / mCE, and which baseline may divide them.

Hendrycks & Dietterich 2019 (ICLR, section 3): CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, relative CE_c =
sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean), mCE / relative mCE = 100 x their mean over the
corruptions. AlexNet's published errors are ImageNet-C's, averaged over all five severities on its 1,000 classes,
so they normalise only scores taken on all five severities of a 1,000-class dataset; anything else is normalised by
a baseline model scored on the same images and severities (docs/EVALUATION.md, "Robustness").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from supcon_scale.evaluation.corruptions import SEVERITIES

# AlexNet's ImageNet-C errors, averaged over severities 1-5 (Hendrycks & Dietterich 2019, their Table 1 baseline),
# and its clean error.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip
ALEXNET_CLEAN_ERROR = 0.4348
IMAGENET_CLASSES = 1000  # the classes AlexNet's ImageNet-C errors were measured on


def _mean(values: float | Sequence[float]) -> float:
    if isinstance(values, (int, float)):
        return float(values)
    values = [float(v) for v in values]
    return math.fsum(values) / len(values)


def defined_corruptions(baseline_errors: Mapping[str, float | Sequence[float]]) -> list[str]:
    """The corruptions whose CE is defined against this baseline: those where it errs at all (CE divides by it)."""
    return [c for c, e in baseline_errors.items() if _mean(e) > 0]


def alexnet_refusal(severities: Sequence[int], num_classes: int) -> str | None:
    """Why AlexNet's errors may not normalise scores on these severities and classes; None when they may."""
    why = []
    if sorted(severities) != list(SEVERITIES):
        shown = " ".join(str(s) for s in severities)
        why.append(f"severities {shown} are not all five (AlexNet's errors are means over severities 1-5)")
    if num_classes != IMAGENET_CLASSES:
        why.append(f"the dataset has {num_classes:,} classes, not ImageNet's 1,000 (AlexNet's errors are ImageNet-C's)")
    return "; ".join(why) or None


def choose_baseline(
    name: str | None, models: Sequence[str], severities: Sequence[int], num_classes: int
) -> tuple[str | None, str]:
    """(baseline, why): "alexnet", one of `models` (scored on the same severities), or None (no CE/mCE) with why.

    `name` is the user's `--baseline`: a model name, "alexnet", or None (AlexNet where it applies, else none).
    """
    refusal = alexnet_refusal(severities, num_classes)
    if name == "alexnet":
        if refusal:
            raise ValueError(f"--baseline: alexnet does not apply here: {refusal}; name a scored checkpoint instead")
        return "alexnet", "--baseline alexnet: ImageNet-C's 1,000 classes at all five severities"
    if name is not None:
        if name not in models:
            raise ValueError(f"--baseline: {name!r} is not one of the checkpoints ({', '.join(models)})")
        return name, f"--baseline {name}: a model scored on the same images at the same severities"
    if refusal is None:
        return "alexnet", "ImageNet-C's 1,000 classes at all five severities: AlexNet, as Hendrycks & Dietterich 2019"
    return None, f"no CE or mCE: {refusal}; pass --baseline NAME (one of the scored checkpoints) to normalise by it"


def _check_errors(errors: Mapping[str, Sequence[float]]) -> None:
    if not errors:
        raise ValueError("errors: no corruptions given")
    for c, e in errors.items():
        if isinstance(e, (int, float)) or len(e) == 0:
            raise ValueError(f"errors.{c}: expected a list of per-severity error rates, got {e!r}")
        if not all(0.0 <= float(v) <= 1.0 for v in e):
            raise ValueError(f"errors.{c}: error rates must be fractions in [0, 1], got {list(e)}")


def _baseline_table(
    errors: Mapping[str, Sequence[float]], baseline: str | Mapping[str, float | Sequence[float]]
) -> dict[str, Any]:
    """The baseline's errors, refusing a mean over other severities than the model's."""
    if isinstance(baseline, str):
        if baseline != "alexnet":
            raise ValueError(f"baseline: expected 'alexnet' or a mapping of corruption errors, got {baseline!r}")
        short = [c for c, e in errors.items() if len(e) != len(SEVERITIES)]
        if short:
            raise ValueError(
                f"errors.{short[0]}: {len(errors[short[0]])} severity error(s), but AlexNet's errors are means over "
                "all five severities; normalise by a baseline model scored on the same severities"
            )
        return {**ALEXNET_ERRORS, "clean": ALEXNET_CLEAN_ERROR}
    base = dict(baseline)
    for c, e in errors.items():
        b = base.get(c)
        if b is not None and not isinstance(b, (int, float)) and len(b) != len(e):
            raise ValueError(f"baseline.{c}: {len(b)} severity error(s), but the model has {len(e)}")
    return base


def corruption_errors_to_mce(
    errors: Mapping[str, Sequence[float]],
    clean_error: float | None = None,
    baseline: str | Mapping[str, float | Sequence[float]] = "alexnet",
) -> dict[str, Any]:
    """CE per corruption, mCE, and with `clean_error` relative CE / relative mCE, all in percent.

    `errors` maps each corruption to its per-severity error rates (fractions). `baseline` is "alexnet" (then every
    corruption needs all five severities) or a mapping of corruption -> the baseline's per-severity errors (as many
    as the model's; a single number is taken as its mean over the same severities) plus "clean" for its clean
    error. The means run over the corruptions in `errors`; each must have a baseline entry.
    """
    _check_errors(errors)
    base = _baseline_table(errors, baseline)
    missing = [c for c in errors if c not in base]
    if missing:
        raise ValueError(f"baseline: no error for corruption(s) {', '.join(missing)}")
    zero = [c for c in errors if _mean(base[c]) == 0]
    if zero:
        raise ValueError(f"baseline: zero error on {', '.join(zero)}; CE is undefined there")
    ce = {c: 100.0 * _mean(e) / _mean(base[c]) for c, e in errors.items()}
    out: dict[str, Any] = {"ce": ce, "mce": math.fsum(ce.values()) / len(ce), "corruptions": list(errors)}
    if clean_error is not None:
        if "clean" not in base:
            raise ValueError("baseline: relative CE needs the baseline's clean error under the key 'clean'")
        bclean = _mean(base["clean"])
        rel = {}
        for c, e in errors.items():
            gap = _mean(base[c]) - bclean
            if gap == 0:
                raise ValueError(f"baseline.{c}: equals the baseline's clean error; relative CE is undefined")
            rel[c] = 100.0 * (_mean(e) - float(clean_error)) / gap
        out["relative_ce"] = rel
        out["relative_mce"] = math.fsum(rel.values()) / len(rel)
    return out
