"""The small-batch evidence's statistics and tables (bench/small_batch.py runs the experiment).

Each arm's top-1 per probe (all labels, a few per digit): the per-seed accuracies, their mean, and the pooled
count with its 95% Wilson interval. Each arm against plain SupCon at batch 32 on the same val images of the same
seed: the exact McNemar test and Newcombe's paired interval over the pooled (seed, image) pairs, and the mean of
the per-seed differences with its t interval over seeds (training noise). A difference is "within noise" when
either interval covers 0. The step cost is each arm's median step time over plain's, measured in one process.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from supcon_scale.evaluation.stats import mcnemar, paired_difference, wilson_interval

BASELINE = "plain"
PROBES = ("all", "few")


def machine() -> dict[str, Any]:
    """The CPU model, its core count, the load averages now, and the Python and torch versions."""
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "load_average_1_5_15": load,
    }  # fmt: skip


def seed_interval(diffs: Sequence[float]) -> tuple[float, float] | None:
    """The 95% Student t interval of the mean of per-seed differences; None below two seeds."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    mean, half = statistics.fmean(diffs), t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


def arm_summary(runs: list[dict], probe: str) -> dict[str, Any]:
    """One arm's top-1 on `probe`: per seed, the mean over seeds, the pooled count with its Wilson interval."""
    scored = [r for r in runs if "probes" in r]
    top1 = {r["seed"]: r["probes"][probe]["top1"] for r in scored}
    correct = sum(r["probes"][probe]["correct"] for r in scored)
    n = sum(r["probes"][probe]["num_val"] for r in scored)
    return {
        "seeds": sorted(top1), "top1_per_seed": top1,
        "interval_95_per_seed": {r["seed"]: wilson_interval(*(r["probes"][probe][k] for k in ("correct", "num_val")))
                                 for r in scored},
        "mean_top1": statistics.fmean(top1.values()) if top1 else None,
        "pooled_correct": correct, "pooled_n": n, "pooled_interval_95": wilson_interval(correct, n) if n else None,
        "num_train": scored[0]["probes"][probe]["num_train"] if scored else None,
    }  # fmt: skip


def compare(arm: list[dict], base: list[dict], probe: str) -> dict[str, Any] | None:
    """`arm` against the baseline on the seeds both finished: McNemar and Newcombe on the pooled pairs, the mean
    per-seed difference with its t interval, and whether the difference is within noise."""
    mine = {r["seed"]: r["probes"][probe] for r in arm if "probes" in r}
    theirs = {r["seed"]: r["probes"][probe] for r in base if "probes" in r}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    a = [c for s in seeds for c in mine[s]["val_correct"]]
    b = [c for s in seeds for c in theirs[s]["val_correct"]]
    diffs = [mine[s]["top1"] - theirs[s]["top1"] for s in seeds]
    test, pooled, over_seeds = mcnemar(a, b), paired_difference(a, b), seed_interval(diffs)
    intervals = [pooled["interval"], *([over_seeds] if over_seeds else [])]
    noise = any(lo <= 0 <= hi for lo, hi in intervals)
    verdict = "within noise" if noise else ("higher" if pooled["difference"] > 0 else "lower") + " than plain"
    return {
        "seeds": seeds, "difference_per_seed": diffs, "mean_difference": statistics.fmean(diffs),
        "seed_interval_95": over_seeds, "pooled_difference": pooled["difference"],
        "pooled_interval_95": pooled["interval"], "mcnemar": test, "within_noise": noise, "verdict": verdict,
        "mcnemar_per_seed": {s: mcnemar(mine[s]["val_correct"], theirs[s]["val_correct"]) for s in seeds},
    }  # fmt: skip


def step_costs(repeats: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per arm: its median step seconds of each repeat, and the median over repeats of its ratio to plain's step
    in the same repeat (arms interleaved within a repeat, so a busy spell of a shared machine hits them alike)."""
    out = {}
    for arm in dict.fromkeys(a for r in repeats for a in r):  # an arm whose cost run failed has no entry
        seconds = [r[arm] for r in repeats if arm in r]
        ratios = [r[arm] / r[BASELINE] for r in repeats if arm in r and r.get(BASELINE)]
        out[arm] = {"step_s_per_repeat": seconds, "median_step_s": statistics.median(seconds),
                    "ratio_to_plain": statistics.median(ratios) if ratios else None}  # fmt: skip
    return out


def summarise(runs: list[dict], arms: dict[str, dict[str, Any]], cost: list[dict[str, float]]) -> dict[str, Any]:
    """Every arm's summaries and comparisons with plain, per probe, and the step costs: the report's body."""
    by_arm = {name: [r for r in runs if r["arm"] == name] for name in arms}
    base = by_arm.get(BASELINE, [])
    table = {}
    for name, arm_runs in by_arm.items():
        row: dict[str, Any] = {"label": arms[name]["label"], "batch": arms[name]["batch"],
                               "failed": [r["seed"] for r in arm_runs if "error" in r],
                               "steps": [r.get("steps") for r in arm_runs if "probes" in r],
                               "note": arms[name].get("note")}  # fmt: skip
        for probe in PROBES:
            row[probe] = arm_summary(arm_runs, probe)
            row[f"{probe}_vs_plain"] = None if name == BASELINE else compare(arm_runs, base, probe)
        table[name] = row
    return {"arms": table, "step_cost": step_costs(cost)}


def _pct(x: float | None) -> str:
    """A fraction as percent with one decimal; "-" for none."""
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(row: dict[str, Any], probe: str) -> str:
    """An arm's top-1 cell: the mean over seeds [pooled Wilson interval] (pooled n)."""
    s = row[probe]
    if s["mean_top1"] is None:
        return "failed"
    lo, hi = s["pooled_interval_95"]
    return f"{_pct(s['mean_top1'])} [{_pct(lo)}, {_pct(hi)}] (n={s['pooled_n']})"


def _delta(c: dict[str, Any] | None) -> str:
    """A comparison cell: the mean difference in points, both intervals, McNemar's p and the verdict."""
    if c is None:
        return "-"
    lo, hi = c["pooled_interval_95"]
    seeds = "" if c["seed_interval_95"] is None else " / seeds [{}, {}]".format(*map(_pct, c["seed_interval_95"]))
    p = c["mcnemar"]["p_value"]
    return f"{100 * c['mean_difference']:+.1f} [{_pct(lo)}, {_pct(hi)}]{seeds}, p={p:.2g}: {c['verdict']}"


def _load(m: dict[str, Any]) -> str:
    """The 1-minute load averages at the start and the end, when known: was the machine shared?"""
    start, end = m.get("load_average_1_5_15"), m.get("load_average_at_end")
    return "" if not start or not end else f" Load average {start[0]:.1f} at the start, {end[0]:.1f} at the end."


def markdown(report: dict[str, Any]) -> str:
    """The table for docs/BENCHMARKS.md and the README, with its machine, protocol and how to read it."""
    body, m, setup = report["summary"], report["machine"], report["setup"]
    cost = body["step_cost"]
    lines = [
        f"Digits (sklearn, {setup['num_train']} train / {setup['num_val']} val images, 32 px), ResNet-18, LARS "
        f"(base lr {setup['base_lr']} per 256), {setup['epochs']} epochs for every arm, seeds "
        f"{', '.join(map(str, setup['seeds']))}; one process on {m['cpu']} ({m['cores']} cores), torch {m['torch']}. "
        f"Linear probe `{setup['probe']}` on the frozen encoder; top-1 in %: mean over seeds [pooled 95% Wilson "
        f"interval] (n = seeds x val images); few labels: {setup['labels_per_class']} train images per digit, "
        f"the same seeded subset for every run.{_load(m)}"
        + (f" The whole experiment took {report['wall_s'] / 60:.0f} min." if report.get("wall_s") else ""),
        "",
        "| arm | batch | steps | top-1, all labels | vs plain | top-1, few labels | vs plain | step time vs plain |",
        "|---|---:|---:|---|---|---|---|---:|",
    ]
    for name, row in body["arms"].items():
        ratio = cost.get(name, {}).get("ratio_to_plain")
        steps = "/".join(sorted({str(s) for s in row["steps"]})) or "-"
        failed = f" (failed seeds: {row['failed']})" if row["failed"] else ""
        lines.append(f"| {row['label']}{failed} | {row['batch']} | {steps} | {_cell(row, 'all')} | "
                     f"{_delta(row['all_vs_plain'])} | {_cell(row, 'few')} | {_delta(row['few_vs_plain'])} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} |")  # fmt: skip
    lines += [
        "",
        "vs plain: the mean of the per-seed differences in points [Newcombe's paired 95% interval over the pooled "
        "(seed, image) pairs] / seeds [Student t 95% interval over the seeds' differences], exact McNemar p on the "
        "pooled pairs; *within noise* when either interval covers 0. Step time: median over "
        f"{setup['cost_repeats']} interleaved repeats of each arm's median step (of {setup['cost_steps']}, batch 32, "
        "loader and hooks included) over plain's in the same repeat.",
        *(f"\n{row['label']}: {row['note']}" for row in body["arms"].values() if row.get("note")),
    ]
    return "\n".join(lines) + "\n"
