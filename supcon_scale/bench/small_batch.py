"""SupCon on a small budget, the evidence (issue 27): digits, one CPU process, global batch 32.

Five arms x seeds, every arm trained for the same number of epochs from the demo recipe (recipes/demo/digits.yaml,
ResNet-18 at 32 px, LARS with lr = base_lr x batch / 256): plain SupCon; + a labelled queue of 1,024 keys from the
encoder itself; + the queue fed by a momentum encoder (0.99); class-balanced batches (m_per_class, m = 4); plain at
batch 256. Each exported encoder gets the linear probe of the demo on the val split with every train label and
with a few per digit; bench/small_batch_report.py turns the runs into intervals, paired comparisons with plain,
the step costs, JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = "demo/digits"
# m = 4 at batch 32: 8 of the 10 digits per batch, each image with 3 others of its class (7 positives per anchor
# with 2 views). m = 2 would need 16 classes; m = 8 leaves 4 digits a batch, so fewer classes to contrast against.
M_PER_CLASS = 4
ARMS: dict[str, dict[str, Any]] = {
    "plain": {"label": "plain SupCon", "batch": 32, "overrides": []},
    "queue": {"label": "+ queue 1,024 (encoder keys)", "batch": 32, "overrides": ["loss.queue_size=1024"]},
    "queue_momentum": {"label": "+ queue 1,024, momentum encoder 0.99", "batch": 32,
                       "overrides": ["loss.queue_size=1024", "model.momentum=0.99"]},
    "m_per_class": {"label": f"m_per_class sampler (m = {M_PER_CLASS})", "batch": 32,
                    "overrides": ["data.sampler=m_per_class", f"data.m_per_class={M_PER_CLASS}"],
                    "note": f"m = {M_PER_CLASS}, the smallest m that divides 32 with 32 / m <= 10 digits: 8 digits "
                            "a batch, every image with 3 others of its digit (7 positives per anchor with 2 views); "
                            "drawn at random, 0.9^31 = 3.8% of the images have no other of their digit in a batch "
                            "of 32."},
    "plain_256": {"label": "plain SupCon", "batch": 256, "overrides": []},
}  # fmt: skip
COST_ARMS = ("plain", "queue", "queue_momentum", "m_per_class")  # the batch-32 arms, timed in one process
PROBE = "fast"  # the demo's probe: L-BFGS on standardised cached features (evaluation/linear_protocols.py)


def parser() -> argparse.ArgumentParser:
    """`tools/small_batch_evidence.py`'s options."""
    p = argparse.ArgumentParser(prog="small_batch_evidence", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the data, the runs and the report")
    p.add_argument(
        "--epochs", type=int, default=2, help="epochs of every arm (default 2: about 25 min in all on 2 idle CPU cores)"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--labels-per-class", type=int, default=5, help="train labels per digit of the few-label probe")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the few-label subset (one for every run)")
    p.add_argument("--workers", type=int, default=1, help="torchvision loader workers of each run (default 1)")
    p.add_argument("--cost-steps", type=int, default=10, help="timed steps per arm and repeat (default 10)")
    p.add_argument("--cost-warmup", type=int, default=2, help="untimed steps before them (default 2)")
    p.add_argument("--cost-repeats", type=int, default=3, help="interleaved repeats of the cost runs (0: none)")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked: exit 2 with one line naming the option on bad input."""
    p = parser()
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms or not args.seeds:
        p.error(f"--arms: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(ARMS)}")
    if min(args.epochs, args.labels_per_class, args.cost_steps) < 1 or min(args.cost_warmup, args.cost_repeats) < 0:
        p.error("--epochs, --labels-per-class and --cost-steps must be >= 1, --cost-warmup and --cost-repeats >= 0")
    return args


def overrides(args: argparse.Namespace, arm: str, seed: int, data_root: Path, out_dir: Path, epochs: int) -> list[str]:
    """The demo recipe as one CPU process on the torchvision loader, at the arm's batch and options."""
    from supcon_scale import config

    base = config.load(RECIPE)
    # the recipe's warm-up share of its epochs (2 of 15), so a shorter run warms up over the same fraction
    warmup = round(base.train.warmup_epochs * epochs / base.train.epochs, 4)
    return [
        f"out_dir={out_dir}", f"seed={seed}", f"data.root={data_root}", "data.backend=torchvision",
        f"data.workers={args.workers}", f"data.global_batch_size={ARMS[arm]['batch']}",
        "model.sync_bn=false",  # one process: batch norm already sees the whole global batch
        "engine.name=ddp", "device=cpu", "train.progress=false", f"train.epochs={epochs}",
        f"train.warmup_epochs={warmup}", *ARMS[arm]["overrides"],
    ]  # fmt: skip


def prepare(out: Path, per_class: int, subset_seed: int) -> tuple[Path, Path]:
    """The demo's digits (data.folder.make_demo_data) and the demo's few-label copy of them (demo.few_labels)."""
    from supcon_scale.data.folder import make_demo_data
    from supcon_scale.demo import few_labels

    data_root = out / "data"
    if not (data_root / "val").is_dir():
        make_demo_data(data_root)
    return data_root, few_labels(data_root, out / "data-few", per_class, subset_seed)


def _finished(run_dir: Path, cfg_overrides: list[str]) -> bool:
    """Whether `run_dir` holds a finished run of exactly this config (then it is reused, not trained again)."""
    from supcon_scale import config
    from supcon_scale.evaluation.linear import run_config

    done = run_config(run_dir) if (run_dir / "encoder.safetensors").is_file() else None
    return done is not None and done.to_dict() == config.load(RECIPE, cfg_overrides).to_dict()


def train(arm: str, seed: int, cfg_overrides: list[str], run_dir: Path, log: Path) -> dict[str, Any]:
    """One run in its own process (`supcon-scale train`): its wall time, steps and last logged loss, or its error."""
    import shutil

    record: dict[str, Any] = {"arm": arm, "seed": seed, "out_dir": str(run_dir), "overrides": cfg_overrides}
    if _finished(run_dir, cfg_overrides):
        record["reused"] = True
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or different earlier run: from scratch
        cmd = [sys.executable, "-m", "supcon_scale.cli", "train", "--config", RECIPE, *cfg_overrides]
        start = time.perf_counter()
        log.parent.mkdir(parents=True, exist_ok=True)
        import supcon_scale

        # the run imports this very package, whatever else an installed copy or the caller's PYTHONPATH holds
        here = str(Path(supcon_scale.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        record["train_s"] = time.perf_counter() - start
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            return {**record, "error": f"exit {rc}: {' | '.join(tail)} (log: {log})"}
    last = (run_dir / "metrics.jsonl").read_text().strip().splitlines()[-1]
    record.update(steps=json.loads(last)["step"], final_loss=json.loads(last)["loss"])
    return record


def evaluate(run_dir: Path, data_root: Path, few_root: Path) -> dict[str, dict[str, Any]]:
    """The exported encoder's linear probe (evaluation/linear.py) with every train label and with the few."""
    from supcon_scale.evaluation.linear import linear_eval, run_config
    from supcon_scale.export import encoder_from_export

    encoder, _ = encoder_from_export(run_dir / "encoder.safetensors")
    stage1 = run_config(run_dir)
    keep = ("top1", "top5", "correct", "num_val", "num_train", "l2", "train_top1", "val_correct")
    probes = {}
    for probe, root in (("all", data_root), ("few", few_root)):
        start = time.perf_counter()
        r = linear_eval(encoder, root, image_size=stage1.data.image_size, preset=PROBE, keep_predictions=True,
                        stage1=stage1)  # fmt: skip
        probes[probe] = {**{k: r.get(k) for k in keep}, "probe_s": time.perf_counter() - start}
    return probes


def step_seconds(args: argparse.Namespace, arm: str, data_root: Path, run_dir: Path) -> float:
    """The median seconds of `--cost-steps` training steps of `arm`, after `--cost-warmup`, in this process: the
    real run (`supcon-scale train`, loader and hooks included), timed between consecutive `on_step` calls."""
    from supcon_scale import cli
    from supcon_scale.hooks import Hook, StepInfo

    class StepTimes(Hook):
        """The clock at the end of every step (after the logger's own hook: each interval is one whole step)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step(self, info: StepInfo) -> None:
            self.times.append(time.perf_counter())

    timer = StepTimes()
    total = args.cost_warmup + args.cost_steps + 1
    cfg = [o for o in overrides(args, arm, 0, data_root, run_dir, 1) if not o.startswith("train.warmup_epochs=")]
    cfg += [f"train.max_steps={total}", "train.warmup_epochs=0"]  # a constant lr: every timed step alike
    if cli.main(["train", "--config", RECIPE, *cfg], hooks=[timer]) != 0:
        raise RuntimeError(f"the cost run of {arm} failed")
    ticks = timer.times[args.cost_warmup :]
    return statistics.median(b - a for a, b in zip(ticks, ticks[1:], strict=False))


def costs(args: argparse.Namespace, data_root: Path, out: Path) -> list[dict[str, float]]:
    """`--cost-repeats` rounds, each timing every batch-32 arm once in turn (the order rotated each round):
    [{arm: median step seconds}]."""
    import shutil

    arms = [a for a in COST_ARMS if a in args.arms or a == "plain"]
    rounds = []
    for i in range(args.cost_repeats):
        row = {}
        for arm in arms[i % len(arms) :] + arms[: i % len(arms)]:  # rotated: no arm is always first or last
            run_dir = out / "cost" / f"{arm}_{i}"
            shutil.rmtree(run_dir, ignore_errors=True)
            try:
                row[arm] = step_seconds(args, arm, data_root, run_dir)
            except Exception as exc:  # an option not merged yet: its row says so, the others still count
                print(f"small_batch_evidence: cost of {arm}: {exc}", file=sys.stderr)
        rounds.append(row)
    return rounds


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, train and probe every (arm, seed), time the steps, and write the JSON and the Markdown table."""
    from supcon_scale import config
    from supcon_scale.bench import small_batch_report as report
    from supcon_scale.files import write_text

    start, out = time.time(), args.out.resolve()
    machine = report.machine()
    data_root, few_root = prepare(out, args.labels_per_class, args.subset_seed)
    plan = {(arm, seed): overrides(args, arm, seed, data_root, out / "runs" / arm / f"seed_{seed}", args.epochs)
            for arm in args.arms for seed in args.seeds}  # fmt: skip
    for cfg in plan.values():  # every arm's config parses before the first run starts, not 20 minutes in
        config.load(RECIPE, cfg)
    runs = []
    for (arm, seed), cfg in plan.items():
        run_dir, name = out / "runs" / arm / f"seed_{seed}", f"{arm}_seed_{seed}"
        record = train(arm, seed, cfg, run_dir, out / "logs" / f"{name}.log")
        probe_file = out / "probes" / f"{name}_few{args.labels_per_class}_subset{args.subset_seed}.json"
        if "error" not in record:
            record["probes"] = _probes(record, run_dir, data_root, few_root, probe_file)
        runs.append(record)
        print(_progress(record), flush=True)
    cost_start = time.time()
    cost = costs(args, data_root, out)
    result = _result(args, runs, cost, machine, data_root, time.time() - cost_start, time.time() - start)
    write_text(out / "small_batch.json", json.dumps(result, indent=1, default=str))
    write_text(out / "small_batch.md", report.markdown(result))
    print(report.markdown(result))
    print(f"wrote {out / 'small_batch.json'} and {out / 'small_batch.md'}")
    return result


def _probes(record: dict[str, Any], run_dir: Path, data_root: Path, few_root: Path, saved: Path) -> dict[str, Any]:
    """The run's probes: read back from `saved` for a reused run (a rerun after a failure), else `evaluate`d."""
    from supcon_scale.files import write_text

    if record.get("reused") and saved.is_file():
        return json.loads(saved.read_text())
    probes = evaluate(run_dir, data_root, few_root)
    saved.parent.mkdir(parents=True, exist_ok=True)
    write_text(saved, json.dumps(probes))
    return probes


def _progress(record: dict[str, Any]) -> str:
    """One line per finished (arm, seed)."""
    head = f"{record['arm']} seed {record['seed']}"
    if "error" in record:
        return f"{head}: FAILED {record['error']}"
    probes = ", ".join(f"{k} labels top-1 {v['top1']:.4f}" for k, v in record["probes"].items())
    took = "reused" if record.get("reused") else f"trained in {record['train_s']:.0f} s"
    return f"{head}: {record['steps']} steps, {took}, loss {record['final_loss']:.3f}; {probes}"


def _result(
    args: argparse.Namespace, runs: list[dict], cost: list[dict[str, float]], machine: dict[str, Any],
    data_root: Path, cost_s: float, wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    """The JSON report: the setup, the machine (load averages at the start and the end), the summary, every run."""
    from supcon_scale import config
    from supcon_scale.bench import small_batch_report as report

    base = config.load(RECIPE)
    count = {s: sum(1 for _ in (data_root / s).rglob("*.jpg")) for s in ("train", "val")}
    setup = {
        "recipe": RECIPE, "epochs": args.epochs, "seeds": args.seeds, "arms": args.arms, "base_lr": base.optim.base_lr,
        "probe": PROBE, "labels_per_class": args.labels_per_class, "subset_seed": args.subset_seed,
        "num_train": count["train"], "num_val": count["val"], "cost_steps": args.cost_steps,
        "cost_warmup": args.cost_warmup, "cost_repeats": args.cost_repeats, "workers": args.workers,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    machine = {**machine, "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    summary = report.summarise(runs, {a: ARMS[a] for a in args.arms}, cost)
    return {"setup": setup, "machine": machine, "summary": summary, "runs": runs, "cost_repeats": cost,
            "cost_s": cost_s, "wall_s": wall_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every run finished, 1 when one failed (its row says so), 2 on bad options."""
    args = parse(argv)
    from supcon_scale import config

    try:
        result = run(args)
    except config.ConfigError as exc:  # an arm's override the merged schema refuses: before any run started
        print(f"small_batch_evidence: error: {exc}", file=sys.stderr)
        return 2
    return 1 if any("error" in r for r in result["runs"]) else 0
