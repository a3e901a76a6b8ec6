"""The end-to-end demo on a CPU: digits -> SupCon on two torchrun ranks -> linear eval -> cross-entropy baseline.

Every stage is the real tool a user runs at scale: `torchrun -m supcon_scale.cli train`, the exported encoder,
`linear_eval`, and the corruption-robustness report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from supcon_scale import arguments, config
from supcon_scale.console import console, table
from supcon_scale.evaluation.stats import accuracy_interval, format_accuracy, mcnemar
from supcon_scale.files import write_text


def _torchrun(cfg_path: Path, nproc: int, overrides: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "supcon_scale.cli",
        "train",
        "--config",
        str(cfg_path),
        *overrides,
    ]
    console.rule(f"[bold]{' '.join(cmd[2:])}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training with {cfg_path} failed with exit status {proc.returncode}")


def run(args: argparse.Namespace) -> dict:
    from supcon_scale.data.folder import make_demo_data

    start = time.time()
    out = Path(args.out)
    data_root = out / "data"
    if not (data_root / "val").is_dir():
        make_demo_data(data_root)
    common = [f"data.root={data_root}", *args.overrides]
    runs, baseline = _train_all(args, out, common)
    cfg = config.load(args.config, common)
    results, few = _probe_all(runs, data_root, few_labels(data_root, out / "data-few", args.labels_per_class, cfg.seed),
                              cfg.data.image_size, args.labels_per_class)  # fmt: skip
    robustness = None
    if not args.skip_robustness:
        robustness = _robustness(runs, baseline, out, data_root, cfg, args.c_per_class)
    pictures = _pictures(out, runs, data_root, cfg.data.image_size)
    main_run = next(iter(runs))
    n_val = results[main_run]["num_val"]
    tests = comparisons(results, few)  # every model against cross-entropy on the same val images: exact McNemar
    summary = {
        "linear_top1": results[main_run]["top1"],
        "linear_top5": results[main_run]["top5"],
        "ce_top1": results[baseline]["top1"],
        "ce_top5": results[baseline]["top5"],
        **{f"{n}_top1": r["top1"] for n, r in results.items() if n not in (main_run, baseline)},
        "num_val": n_val,
        "labels_per_class": args.labels_per_class,
        "few_label_top1": {n: r["top1"] for n, r in few.items()},
        "intervals_95": {n: accuracy_interval(r["top1"], n_val) for n, r in results.items()},
        "few_label_intervals_95": {n: accuracy_interval(r["top1"], r["num_val"]) for n, r in few.items()},
        "comparisons": [c["line"] for c in tests],
        "mcnemar": [{k: v for k, v in c.items() if k != "line"} for c in tests],
        "wall_time_s": time.time() - start,
        "nproc": args.nproc,
        "config": cfg.to_dict(),
        "robustness": robustness,
        "pictures": [str(p) for p in pictures],
    }
    _print_summary(args, summary, results, few, tests)
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {out / 'summary.json'}")
    return summary


def _train_all(args: argparse.Namespace, out: Path, common: list[str]) -> tuple[dict[str, Path], str]:
    """Train every run from scratch on `args.nproc` torchrun ranks: {its `loss.name`: its folder}, and the name of
    the classifier baseline (the cross-entropy run: the other runs are compared with it, GenSCL's teacher)."""
    from supcon_scale import objectives

    names = [config.load(path, common).loss.name for path in (args.config, args.ce_config)]
    if not objectives.trains_classifier(names[1]) or objectives.trains_classifier(names[0]) or len(set(names)) < 2:
        raise ValueError(f"--ce-config: the baseline must train a classifier and --config an embedding, got {names}")
    baseline = names[1]
    runs = {names[0]: (args.config, []), baseline: (args.ce_config, [])}
    if args.genscl:  # after the cross-entropy run: it is GenSCL's teacher
        runs[config.load(args.genscl_config, common).loss.name] = (args.genscl_config, [f"kd.teacher={out / baseline}"])
    for name, (cfg_path, extra) in runs.items():
        shutil.rmtree(out / name, ignore_errors=True)  # the demo trains from scratch every time
        _torchrun(cfg_path, args.nproc, [f"out_dir={out / name}", *common, *extra])
    return {name: out / name for name in runs}, baseline


def _probe_all(
    runs: dict[str, Path], data_root: Path, few_root: Path, image_size: int, per_class: int
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each exported encoder's linear probe on every label, and on `per_class` labels per class."""
    from supcon_scale.evaluation.linear import linear_eval
    from supcon_scale.export import encoder_from_export

    results, few = {}, {}
    for name, run_dir in runs.items():
        encoder, _ = encoder_from_export(run_dir / "encoder.safetensors")
        results[name] = linear_eval(encoder, data_root, image_size=image_size, preset="fast", keep_predictions=True)
        few[name] = linear_eval(encoder, few_root, image_size=image_size, preset="fast", keep_predictions=True)
        console.print(f"{name}: linear top-1 {results[name]['top1']:.4f}, {per_class} labels/class "
                      f"{few[name]['top1']:.4f}")  # fmt: skip
    return results, few


def _robustness(
    runs: dict[str, Path], baseline: str, out: Path, data_root: Path, cfg: config.RunConfig, per_class: int
) -> dict:
    """The corruption-robustness report of every run, CE normalised by the baseline run."""
    from supcon_scale.evaluation.c_dataset import generate_c
    from supcon_scale.evaluation.robustness import robustness_report

    # A subset keeps the demo short: the first `per_class` val images of each digit, 15 corruptions x 5 severities.
    generate_c(data_root / "val", out / "data-C", per_class=per_class, seed=cfg.seed)
    return robustness_report(
        {name: run_dir / "encoder.safetensors" for name, run_dir in runs.items()},
        c_root=out / "data-C",
        clean_root=data_root,
        out_dir=out / "robustness",
        baseline_name=baseline,
        image_size=cfg.data.image_size,
    )


def _print_summary(args: argparse.Namespace, summary: dict, results: dict, few: dict, tests: list[dict]) -> None:
    """The table (all labels, few labels, mCE), the McNemar lines, and where the plots and pictures are."""
    n_val, robustness = summary["num_val"], summary["robustness"]
    columns = ["model", "top-1 [95% CI] (n), McNemar p vs CE, all labels",
               f"top-1 [95% CI] (n), McNemar p vs CE, {args.labels_per_class} labels/class"]  # fmt: skip
    p = {(c["model"], c["probe"]): f" p={c['p_value']:.2g}" for c in tests}
    rows = [(LABELS.get(n, n), format_accuracy(r["top1"], n_val) + p.get((n, "all labels"), ""),
             format_accuracy(few[n]["top1"], few[n]["num_val"]) + p.get((n, "few labels"), ""))
            for n, r in results.items()]  # fmt: skip
    undefined = robustness is not None and any("relative_mce_undefined" in m for m in robustness["models"].values())
    if robustness is not None:
        columns += ["mCE (CE = 100)"] + ([] if undefined else ["relative mCE"])
        models = robustness["models"]
        rows = [row + (f"{models[n]['mce']:.1f}" if "mce" in models[n] else "-",)
                + (() if undefined else (f"{models[n]['relative_mce']:.1f}" if "relative_mce" in models[n] else "-",))
                for row, n in zip(rows, results, strict=True)]  # fmt: skip
    title = f"digits demo: {args.nproc} torchrun ranks, {summary['wall_time_s']:.0f} s"
    console.print(table(title, columns, rows))
    for line in summary["comparisons"]:
        console.print(line)
    if undefined:
        why = next(m["relative_mce_undefined"] for m in robustness["models"].values() if "relative_mce_undefined" in m)
        console.print(f"relative mCE not reported: {why} (a ratio over a near-zero baseline gap is noise)")
    if robustness is not None:
        console.print(f"mCE baseline: {robustness['baseline']} ({robustness['baseline_why']})")
        console.print(f"robustness plots: {', '.join(robustness['plots'].values())}")
    console.print(f"pictures: {', '.join(summary['pictures'])}", soft_wrap=True)


def _pictures(out: Path, run_dirs: dict[str, Path], data_root: Path, image_size: int) -> list[Path]:
    """The SupCon and cross-entropy embedding maps side by side, and each run's training curves (out/pictures)."""
    from supcon_scale.evaluation.embedding import side_by_side
    from supcon_scale.evaluation.plots import plot_run

    shown = {LABELS.get(n, n).split(" +")[0]: d / "encoder.safetensors" for n, d in run_dirs.items()}
    maps = side_by_side(shown, data_root, out / "pictures" / "embeddings.png", image_size)
    return [maps] + [p for name, d in run_dirs.items() for p in plot_run(d, out / "pictures" / name)]


LABELS = {"supcon": "SupCon + linear", "cross_entropy": "Cross-entropy + linear", "genscl": "GenSCL (KD) + linear"}


def few_labels(data_root: Path, out: Path, per_class: int, seed: int) -> Path:
    """`out/train` with `per_class` images of each class (a seeded draw) and `out/val` the full validation split.

    With 1,437 labelled digits every encoder saturates a linear probe; a few labels per class is where the
    representations differ (the paper's transfer tables report the same regime).
    """
    import random

    if (out / "train").is_dir():
        shutil.rmtree(out)
    rng = random.Random(seed)
    for folder in sorted((data_root / "train").iterdir()):
        files = sorted(folder.iterdir())
        dst = out / "train" / folder.name
        dst.mkdir(parents=True)
        for f in rng.sample(files, min(per_class, len(files))):
            shutil.copy(f, dst / f.name)
    shutil.copytree(data_root / "val", out / "val")
    return out


def comparisons(results: dict[str, dict], few: dict[str, dict]) -> list[dict]:
    """Each model against the cross-entropy baseline (`results` keyed by `loss.name`), per probe, on the same val
    images: both accuracies with their 95% intervals, and an exact McNemar test on the images one model gets right
    and the other wrong (stats.mcnemar).

    Paired, so it sees what overlapping intervals miss: two models scored on the same images share their hard ones.
    """
    from supcon_scale import objectives

    baseline = next(n for n in results if objectives.trains_classifier(n))
    out = []
    for probe, rows in (("all labels", results), ("few labels", few)):
        base = rows[baseline]
        for name, r in rows.items():
            if name == baseline:
                continue
            test = mcnemar(r["val_correct"], base["val_correct"])
            a, b = test["only_a"], test["only_b"]
            if test["p_value"] < 0.05:
                verdict = f"{'higher' if a > b else 'lower'} than cross-entropy (p < 0.05)"
            else:
                verdict = "no significant difference (p >= 0.05)"
            label = LABELS.get(name, name)
            line = (f"{label} vs cross-entropy, {probe}: {format_accuracy(r['top1'], r['num_val'])} vs "
                    f"{format_accuracy(base['top1'], base['num_val'])}; exact McNemar p={test['p_value']:.3g} on the "
                    f"{a + b} images only one gets right ({a} {label.split(' +')[0]}, {b} cross-entropy): "
                    f"{verdict}")  # fmt: skip
            out.append({"model": name, "baseline": baseline, "probe": probe, **test, "verdict": verdict,
                        "line": line})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    run(arguments.demo().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
