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

from supcon_scale import config
from supcon_scale.console import console, table


def _torchrun(cfg_path: Path, nproc: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "supcon_scale.cli", "train", "--config", str(cfg_path), *overrides]
    console.rule(f"[bold]{' '.join(cmd[2:])}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"training with {cfg_path} failed with exit status {proc.returncode}")


def run(args: argparse.Namespace) -> dict:
    from supcon_scale.checkpoint import load_encoder
    from supcon_scale.data.folder import make_demo_data
    from supcon_scale.evaluation.linear import linear_eval
    from supcon_scale.evaluation.robustness import generate_c, robustness_report

    start = time.time()
    out = Path(args.out)
    data_root = out / "data"
    if not (data_root / "val").is_dir():
        make_demo_data(data_root)
    common = [f"data.root={data_root}", *args.overrides]
    runs = {"supcon": (args.config, out / "supcon", []), "cross_entropy": (args.ce_config, out / "cross_entropy", [])}
    if args.genscl:  # after the cross-entropy run: it is GenSCL's teacher
        runs["genscl"] = (args.genscl_config, out / "genscl", [f"kd.teacher={out / 'cross_entropy'}"])
    for name, (cfg_path, run_dir, extra) in runs.items():
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo trains from scratch every time
        _torchrun(cfg_path, args.nproc, [f"out_dir={run_dir}", *common, *extra])

    cfg = config.load(args.config, common)
    results = {}
    for name, (_, run_dir, _) in runs.items():
        encoder, _ = load_encoder(run_dir / "encoder.safetensors")
        results[name] = linear_eval(encoder, data_root, image_size=cfg.data.image_size, preset="fast")
        console.print(f"{name}: linear top-1 {results[name]['top1']:.4f}")

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

    summary = {
        "linear_top1": results["supcon"]["top1"],
        "linear_top5": results["supcon"]["top5"],
        "ce_top1": results["cross_entropy"]["top1"],
        "ce_top5": results["cross_entropy"]["top5"],
        **({"genscl_top1": results["genscl"]["top1"]} if "genscl" in results else {}),
        "wall_time_s": time.time() - start,
        "nproc": args.nproc,
        "config": cfg.to_dict(),
        "robustness": robustness,
    }
    labels = {"supcon": "SupCon + linear", "cross_entropy": "Cross-entropy + linear", "genscl": "GenSCL (KD) + linear"}
    columns = ["model", "top-1", "top-5"]
    rows = [(labels[n], r["top1"], r["top5"]) for n, r in results.items()]
    if robustness is not None:
        columns += ["mCE (CE = 100)", "relative mCE"]
        rows = [row + (robustness["models"][n]["mce"], robustness["models"][n].get("relative_mce", float("nan")))
                for row, n in zip(rows, results)]
    title = f"digits demo: {args.nproc} torchrun ranks, {summary['wall_time_s']:.0f} s"
    console.print(table(title, columns, rows))
    if robustness is not None:
        console.print(f"robustness plots: {', '.join(robustness['plots'].values())}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"wrote {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="supcon-scale demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="where data, runs and summary.json go")
    p.add_argument("--config", type=Path, default=Path("configs/demo/digits.yaml"))
    p.add_argument("--ce-config", type=Path, default=Path("configs/demo/digits_ce.yaml"))
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks (gloo on CPU)")
    p.add_argument("--genscl-config", type=Path, default=Path("configs/demo/digits_genscl.yaml"))
    p.add_argument("--genscl", action="store_true", help="also train GenSCL with the cross-entropy model as teacher")
    p.add_argument("--skip-robustness", action="store_true")
    p.add_argument("--c-per-class", type=int, default=8, help="val images per digit in digits-C (75 versions each)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
