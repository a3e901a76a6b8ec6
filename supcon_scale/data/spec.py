"""AugmentSpec: `data.augment` at one image size, the one description both backends build their views from.

The preset picks which operations run and in which order (PRESET_STAGES); the config keys give their values, so
every value is overridable and an operation is switched off by setting its probability to 0. AugmentSpec is an
AugmentConfig (the keys are declared once, in config.py) plus the image size and the operations' fixed
parameters, so the DALI and torchvision backends apply the same augmentation.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from supcon_scale.config import AugmentConfig, DataConfig

SMALL_CROP_SCALE_DEFAULT = tuple(AugmentConfig().small_crop_scale)

# Which colour/photometric stages each preset runs, in order, after random-resized-crop and flip.
PRESET_STAGES: dict[str, tuple[str, ...]] = {
    # SimCLR's colour distortion (Chen et al. 2020, appendix A).
    "simclr": ("jitter", "grayscale", "blur"),
    "randaugment": ("randaugment",),
    # SimCLR jitter -> RandAugment: the data-loading benchmark's spec (docs/BENCHMARKS.md).
    "jitter_randaugment": ("jitter", "randaugment"),
    # "Stacked RandAugment", the ResNet-200 recipe of the google-research/supcon scripts: SimCLR jitter ->
    # RandAugment -> grayscale -> blur.
    "stacked_randaugment": ("jitter", "randaugment", "grayscale", "blur"),
    "autoaugment": ("autoaugment",),
    "none": (),
}


@dataclass(kw_only=True)
class AugmentSpec(AugmentConfig):
    """A training view: random-resized-crop to `image_size`, flip, then `stages` in order, then normalisation."""

    image_size: int
    stages: tuple[str, ...] | None = None  # the preset's (PRESET_STAGES) when None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    randaugment_bins: int = 31  # magnitudes 0..30: the default of DALI's and torchvision's RandAugment

    def __post_init__(self) -> None:
        if self.preset not in PRESET_STAGES:
            raise ValueError(
                f"data.augment.preset: unknown preset {self.preset!r}; choose one of {sorted(PRESET_STAGES)}"
            )
        if self.stages is None:
            self.stages = PRESET_STAGES[self.preset]

    @property
    def blur_kernel(self) -> int:
        """SimCLR's odd kernel of about 10% of the image side."""
        k = max(3, int(0.1 * self.image_size))
        return k if k % 2 else k + 1

    def has(self, stage: str) -> bool:
        return stage in self.stages


def spec_from_config(aug: AugmentConfig, image_size: int) -> AugmentSpec:
    """The AugmentSpec for `data.augment` at `data.image_size`."""
    values = {f.name: getattr(aug, f.name) for f in dataclasses.fields(AugmentConfig)}
    return AugmentSpec(image_size=image_size, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def view_specs(cfg: DataConfig) -> list[AugmentSpec]:
    """Each training view's AugmentSpec, in view order: every view at `data.image_size` with `data.augment.crop_scale`,
    or with `data.view_sizes` (multi-crop, SwAV, Caron et al. 2020, sec. 3.2) the views smaller than
    `data.image_size` at their own size with `data.augment.small_crop_scale`. Equal specs are one object."""
    large = spec_from_config(cfg.augment, cfg.image_size)
    sizes = cfg.view_sizes or [cfg.image_size] * cfg.views
    small = {s: dataclasses.replace(large, image_size=s, crop_scale=large.small_crop_scale) for s in set(sizes)}
    if min(sizes) == cfg.image_size and tuple(cfg.augment.small_crop_scale) != SMALL_CROP_SCALE_DEFAULT:
        warnings.warn(
            "data.augment.small_crop_scale only acts on views smaller than data.image_size (data.view_sizes); "
            "no view is, so it is ignored",
            stacklevel=2,
        )
    return [large if s == cfg.image_size else small[s] for s in sizes]


def same_views(specs: Sequence[AugmentSpec]) -> bool:
    """Whether every view has one spec (one size and crop scale): the DALI backend's batched ROI layout needs it."""
    return all(s == specs[0] for s in specs)


def preset(name: str, image_size: int = 224, **overrides: object) -> AugmentSpec:
    """A preset by name with optional field overrides (benchmarks and tests)."""
    return AugmentSpec(preset=name, image_size=image_size, **overrides)  # type: ignore[arg-type]
