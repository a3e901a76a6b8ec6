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
    from supcon_scale.evaluation.linear import linear_eval
    from supcon_scale.evaluation.robustness import generate_c, robustness_report
    from supcon_scale.export import encoder_from_export

    start = time.time()
    out = Path(args.out)
    data_root = out / "data"
    if not (data_root / "val").is_dir():
        make_demo_data(data_root)
    common = [f"data.root={data_root}", *args.overrides]
    runs = {"supcon": (args.config, out / "supcon", []), "cross_entropy": (args.ce_config, out / "cross_entropy", [])}
    if args.genscl:  # after the cross-entropy run: it is GenSCL's teacher
        runs["genscl"] = (args.genscl_config, out / "genscl", [f"kd.teacher={out / 'cross_entropy'}"])
    for cfg_path, run_dir, extra in runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo trains from scratch every time
        _torchrun(cfg_path, args.nproc, [f"out_dir={run_dir}", *common, *extra])

    cfg = config.load(args.config, common)
    few_root = few_labels(data_root, out / "data-few", args.labels_per_class, cfg.seed)
    results, few = {}, {}
    for name, (_, run_dir, _) in runs.items():
        encoder, _ = encoder_from_export(run_dir / "encoder.safetensors")
        results[name] = linear_eval(encoder, data_root, image_size=cfg.data.image_size, preset="fast",
                                    keep_predictions=True)  # fmt: skip
        few[name] = linear_eval(encoder, few_root, image_size=cfg.data.image_size, preset="fast", keep_predictions=True)
        console.print(f"{name}: linear top-1 {results[name]['top1']:.4f}, {args.labels_per_class} labels/class "
                      f"{few[name]['top1']:.4f}")  # fmt: skip

    robustness = None
    if not args.skip_robustness:
        # A subset keeps the demo short: the first `per_class` val images of each digit, 15 corruptions x 5 severities.
        generate_c(data_root / "val", out / "data-C", per_class=args.c_per_class, seed=cfg.seed)
        robustness = robustness_report(
            {name: run_dir / "encoder.safetensors" for name, (_, run_dir, _) in runs.items()},
            c_root=out / "data-C",
            clean_root=data_root,
            out_dir=out / "robustness",
            baseline_name="cross_entropy",
            image_size=cfg.data.image_size,
        )

    pictures = _pictures(out, {name: run_dir for name, (_, run_dir, _) in runs.items()}, data_root, cfg.data.image_size)
    n_val = results["supcon"]["num_val"]
    tests = comparisons(results, few)  # every model against cross-entropy on the same val images: exact McNemar
    summary = {
        "linear_top1": results["supcon"]["top1"],
        "linear_top5": results["supcon"]["top5"],
        "ce_top1": results["cross_entropy"]["top1"],
        "ce_top5": results["cross_entropy"]["top5"],
        **({"genscl_top1": results["genscl"]["top1"]} if "genscl" in results else {}),
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
    columns = ["model", "top-1 [95% CI] (n), McNemar p vs CE, all labels",
               f"top-1 [95% CI] (n), McNemar p vs CE, {args.labels_per_class} labels/class"]  # fmt: skip
    p = {(c["model"], c["probe"]): f" p={c['p_value']:.2g}" for c in tests}
    rows = [(LABELS[n], format_accuracy(r["top1"], n_val) + p.get((n, "all labels"), ""),
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
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {out / 'summary.json'}")
    return summary


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
    """Each model against the cross-entropy baseline, per probe, on the same val images: both accuracies with their
    95% intervals, and an exact McNemar test on the images one model gets right and the other wrong (stats.mcnemar).

    Paired, so it sees what overlapping intervals miss: two models scored on the same images share their hard ones.
    """
    out = []
    for probe, rows in (("all labels", results), ("few labels", few)):
        base = rows["cross_entropy"]
        for name, r in rows.items():
            if name == "cross_entropy":
                continue
            test = mcnemar(r["val_correct"], base["val_correct"])
            a, b = test["only_a"], test["only_b"]
            if test["p_value"] < 0.05:
                verdict = f"{'higher' if a > b else 'lower'} than cross-entropy (p < 0.05)"
            else:
                verdict = "no significant difference (p >= 0.05)"
            line = (f"{LABELS[name]} vs cross-entropy, {probe}: {format_accuracy(r['top1'], r['num_val'])} vs "
                    f"{format_accuracy(base['top1'], base['num_val'])}; exact McNemar p={test['p_value']:.3g} on the "
                    f"{a + b} images only one gets right ({a} {LABELS[name].split(' +')[0]}, {b} cross-entropy): "
                    f"{verdict}")  # fmt: skip
            out.append({"model": name, "baseline": "cross_entropy", "probe": probe, **test, "verdict": verdict,
                        "line": line})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    run(arguments.demo().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
