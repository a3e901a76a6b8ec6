"""`tools/bench_startup.py`: time from process start to the first training step, and peak RSS, against dataset size.

The tool writes N tiny JPEGs in 1,000 class folders (once per size, kept for later calls), then launches real
training processes (`supcon-scale train`, a ResNet-18 at 16 px, one step) with 1 or 2 ranks (torchrun, gloo):
cold (no manifest: every file is decoded, split over the ranks) and warm (the manifest of the cold run: nothing is
decoded). The OS page cache is not dropped (that needs root), so "cold" means cold for the scan, not for the disk.
Each launch's `on_resume`/`on_batch`/`on_step` times, measured from the launcher's clock before the process
started, and the peak RSS of rank 0 are reported as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from supcon_scale.hooks import Hook, StepInfo

CLASSES = 1000


def write_dataset(root: Path, n: int, classes: int = CLASSES) -> Path:
    """`root/train/c0000..c0999/*.jpg`: `n` 16x16 JPEGs (64 distinct noise images, a few hundred bytes each)."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        blobs.append(buf.getvalue())
    folders = [root / "train" / f"c{k:04d}" for k in range(classes)]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with open(folders[i % classes] / f"{i:07d}.jpg", "wb") as f:
            f.write(blobs[i % len(blobs)])
    done.write_text(str(n))
    return root


class _Times(Hook, logging.Handler):
    """Wall-clock times of the run's milestones and the scan's counts (from the data index's log line)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.out: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "supcon_scale.data.index" and record.msg.startswith("data:"):
            samples, decoded, _, reused, seconds = record.args  # type: ignore[misc]
            self.out.update(samples=samples, decoded=decoded, reused=reused, scan_s=seconds, t_scanned=time.time())

    def on_resume(self, step: int, epoch: int) -> None:
        self.out.setdefault("t_resume", time.time())

    def on_batch(self, step: int, views: list, labels: Any) -> tuple:
        self.out.setdefault("t_first_batch", time.time())
        return views, labels

    def on_step(self, info: StepInfo) -> None:
        self.out.setdefault("t_first_step", time.time())


def child(report: Path, argv: list[str]) -> int:
    """One training process: `supcon-scale train ARGV` with the timing hook; rank 0 writes `report`."""
    from supcon_scale import cli

    times = _Times()
    log = logging.getLogger("supcon_scale.data.index")
    log.setLevel(logging.INFO)
    log.addHandler(times)
    code = cli.main(["train", *argv], hooks=[times])
    if int(os.environ.get("RANK", "0")) == 0:
        times.out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report.write_text(json.dumps(times.out))
    return code


def launch(root: Path, work: Path, ranks: int, manifest: Path, tag: str) -> dict[str, Any]:
    """One training launch over `root`; seconds from before the process started to each milestone."""
    out_dir = work / f"run-{tag}"
    report = work / f"report-{tag}.json"
    args = [
        "--config",
        "demo/digits",
        f"data.root={root}",
        f"out_dir={out_dir}",
        f"data.manifest={manifest}",
        "data.backend=torchvision",
        "data.workers=0",
        "data.image_size=16",
        f"data.global_batch_size={8 * ranks}",
        "model.sync_bn=false",
        "train.max_steps=1",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "train.log_every=1",
        "precision=fp32",
        "device=cpu",
    ]
    module = [sys.executable, "-m", "supcon_scale.bench.startup", "--child", str(report), "--"]
    if ranks > 1:
        with socket.socket() as sock:  # torchrun's --master_port=0 leaves the ranks waiting on port 0
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
        cmd = [*run, "-m", "supcon_scale.bench.startup", "--child", str(report), "--", *args]
    else:
        cmd = [*module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"launch {tag} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-5:]}")
    r = json.loads(report.read_text())
    row = {k: v for k, v in r.items() if not k.startswith("t_")}
    for k in ("t_scanned", "t_resume", "t_first_batch", "t_first_step"):
        if k in r:
            row["s_to_" + k[2:]] = r[k] - t0
    row["process_wall_s"] = wall
    return row


def main(argv: list[str] | None = None) -> int:
    """Start-up time and peak RSS against dataset size, cold and warm, 1 and 2 ranks; a table and JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        return child(Path(argv[1]), rest)
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(prog="bench_startup", description=main.__doc__)
    p.add_argument("--sizes", default="10000,100000", help="comma list of dataset sizes (files), e.g. 10000,1000000")
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts")
    p.add_argument("--work", type=Path, default=Path("runs/bench_startup"), help="datasets and runs go here")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = p.parse_args(argv)
    console = Console()
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        t0 = time.time()
        root = write_dataset(args.work / f"data-{n}", n)
        console.print(f"{n} files ready in {time.time() - t0:.0f} s")
        for ranks in [int(x) for x in args.ranks.split(",")]:
            manifest = args.work / f"manifest-{n}-{ranks}.tsv"
            manifest.unlink(missing_ok=True)
            for phase in ("cold", "warm"):
                row = launch(root, args.work, ranks, manifest, f"{n}-{ranks}-{phase}")
                rows.append({"files": n, "ranks": ranks, "phase": phase, **row})
                console.print(rows[-1])
    table = Table(title=f"start-up: {len(os.sched_getaffinity(0))} CPUs")
    for col in ("files", "ranks", "phase", "decoded", "scan s", "s to scan done", "s to first step", "peak RSS MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["files"]),
            str(r["ranks"]),
            r["phase"],
            str(r.get("decoded", "-")),
            f"{r.get('scan_s', float('nan')):.2f}",
            f"{r.get('s_to_scanned', float('nan')):.1f}",
            f"{r.get('s_to_first_step', float('nan')):.1f}",
            f"{r['peak_rss_mib']:.0f}",
        )
    console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
