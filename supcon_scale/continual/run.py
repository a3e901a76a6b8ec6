"""`supcon-scale continual`: SCR and the ER baseline on a class-incremental stream, every method x seed, then
the summary (JSON), the accuracy matrices and the per-stage accuracy (PNG).

Run under torchrun for several ranks (`torchrun ... -m supcon_scale.cli continual --config ...`); each run's
checkpoints, metrics and result live in OUT_DIR/<method>/seed_<s>/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from supcon_scale import arguments, distributed
from supcon_scale.console import console, table
from supcon_scale.continual import config, metrics
from supcon_scale.continual.learner import RunResult, check_resumable, fit, load_result, plain_json
from supcon_scale.continual.stream import load_sources
from supcon_scale.files import check_target, write_text
from supcon_scale.resilience import EXIT_PREEMPTED, Preempted, notify_agent


def aggregate(results: list[RunResult]) -> dict[str, Any]:
    """Per method: the mean matrix and each metric's mean with its 95% t-interval over seeds."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        mats = np.stack([metrics.as_matrix(r.matrix) for r in runs])
        entry: dict[str, Any] = {"seeds": [r.seed for r in runs], "mean_matrix": mats.mean(axis=0).tolist()}
        for key in ("final_average_accuracy", "average_forgetting", "average_incremental_accuracy"):
            values = [metrics.summarize(m)[key] for m in mats]
            mean, half = metrics.t_interval(values)
            entry[key] = {"mean": mean, "ci95": half, "per_seed": values}
        stage = np.stack([metrics.stage_accuracy(m) for m in mats])
        entry["stage_accuracy"] = [
            dict(zip(("mean", "ci95"), metrics.t_interval(stage[:, i]), strict=True)) for i in range(stage.shape[1])
        ]
        out[method] = entry
    return out


def paired_difference(results: list[RunResult]) -> dict[str, Any] | None:
    """SCR minus ER final average accuracy, seed by seed: one seed gives both the same stream and the same memory
    decisions, so the per-seed differences are paired; their mean with its 95% t-interval."""
    final = {(r.method, r.seed): r.summary["final_average_accuracy"] for r in results}
    seeds = sorted({s for (m, s) in final if (("scr", s) in final and ("er", s) in final)})
    if not seeds:
        return None
    diffs = [final[("scr", s)] - final[("er", s)] for s in seeds]
    mean, half = metrics.t_interval(diffs)
    return {"scr_minus_er_final_average_accuracy": {"mean": mean, "ci95": half, "per_seed": diffs, "seeds": seeds}}


def run(cfg: config.ContinualConfig, ctx: distributed.Context, json_path: Path | None = None) -> dict[str, Any]:
    """Every method x seed (under `train.resume=auto` a finished run's result is kept), then the summary."""
    start = time.time()
    for method in cfg.methods:  # every run's result or checkpoint against this config, before any run trains
        for seed in cfg.seeds:
            check_resumable(cfg, method, seed)
    sources = load_sources(cfg, ctx)
    results = []
    for method in cfg.methods:
        for seed in cfg.seeds:
            done = load_result(cfg, method, seed) if cfg.train.resume == "auto" else None
            if done is not None:
                if ctx.is_main:
                    console.print(f"{method} seed {seed}: finished before, result kept")
                results.append(done)
                continue
            results.append(fit(cfg, method, seed, ctx, sources))
    summary = {
        "methods": aggregate(results),
        "paired_difference": paired_difference(results),
        "runs": [r.to_dict() for r in results],
        "interval": "95% Student-t interval over seeds: mean +- t(0.975, n-1) * sd / sqrt(n)",
        "wall_time_s": time.time() - start,
        "world_size": ctx.world_size,
        "config": cfg.to_dict(),
    }
    if ctx.is_main:
        write_summary(cfg, ctx, summary, json_path or Path(cfg.out_dir) / "summary.json")
    return summary


def write_summary(cfg: config.ContinualConfig, ctx: distributed.Context, summary: dict[str, Any], path: Path) -> None:
    """Main rank: the plots beside the summary, the summary JSON at `path`, and the table on the console."""
    from supcon_scale.continual.plots import plot_matrices, plot_stage_accuracy

    out = Path(cfg.out_dir)
    methods = summary["methods"]
    summary["plots"] = {
        "matrix": str(
            plot_matrices(
                {m: np.array(e["mean_matrix"], dtype=float) for m, e in methods.items()},
                out / "accuracy_matrix.png",
            )
        ),
        "stage_accuracy": str(
            plot_stage_accuracy(
                {
                    m: (
                        np.array([s["mean"] for s in e["stage_accuracy"]]),
                        np.array([s["ci95"] for s in e["stage_accuracy"]]),
                    )
                    for m, e in methods.items()
                },
                out / "stage_accuracy.png",
            )
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(plain_json(summary), indent=2))
    rows = []
    for m, e in methods.items():
        cell = lambda k, e=e: f"{100 * e[k]['mean']:.1f} +- {100 * e[k]['ci95']:.1f}"
        rows.append(
            (
                m,
                cell("final_average_accuracy"),
                cell("average_forgetting"),
                cell("average_incremental_accuracy"),
                len(e["seeds"]),
            )
        )
    title = (
        f"class-incremental, {cfg.stream.tasks} tasks, memory {cfg.memory.size}: "
        f"{summary['wall_time_s']:.0f} s on {ctx.world_size} rank(s)"
    )
    console.print(table(title, ["method", "final avg acc %", "forgetting %", "avg incremental acc %", "seeds"], rows))
    if summary["paired_difference"] is not None:
        d = summary["paired_difference"]["scr_minus_er_final_average_accuracy"]
        console.print(
            f"SCR - ER final average accuracy, paired by seed: {100 * d['mean']:+.1f} +- {100 * d['ci95']:.1f}"
        )
    console.print(f"wrote {path}, {summary['plots']['matrix']}, {summary['plots']['stage_accuracy']}")


def main(argv: list[str] | None = None) -> int:
    args = arguments.continual().parse_args(argv)
    cfg = config.load(args.config, args.overrides)
    if args.json is not None:
        check_target(args.json)  # a device or directory there: refused before hours of training, not after
    ctx = distributed.init(cfg.engine.backend, cfg.seeds[0])
    try:
        distributed.agree_on_config(cfg.to_dict())  # before any collective a divergent config could deadlock
        config.check(cfg, ctx.world_size)
        run(cfg, ctx, args.json)
    except Preempted as exc:
        print(f"supcon-scale: {exc}", file=sys.stderr)
        notify_agent(exc)  # the checkpoint is complete: this node's torchrun agent may say so, and not restart
        return EXIT_PREEMPTED
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
