"""A run you can watch: plain log lines when stderr is a file, the TensorBoard and W&B sinks holding what
metrics.jsonl holds (a resumed run keeps its W&B id), the profiler trace, the time shares' arithmetic, a failing sink
and a missing extra."""

import json
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from supcon_scale import cli, console, sinks
from supcon_scale.engines import EngineSpec
from supcon_scale.hooks import Hook, StepInfo

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d+)/\d+ epoch (\d+) loss (\d+\.\d{4}) emb-std \d\.\d{4} lr (\S+) "
    r"([\d,]+) views/s "
    r"data (\d+)% fwd\+bwd (\d+)% optim (\d+)% eta \d+:\d\d:\d\d$"
)


def _train(out: Path, digits: Path, *extra: str) -> str:
    """`supcon-scale train` in a subprocess with stderr redirected to a file (as under SLURM); returns that file."""
    args = [
        "--config", "demo/digits", f"data.root={digits}", f"out_dir={out}", "data.global_batch_size=64",
        "data.image_size=16", "data.backend=torchvision", "data.workers=0", "train.epochs=2", "train.warmup_epochs=1",
        "train.log_every=2", "log.tensorboard=true", "log.wandb=true", *extra,
    ]  # fmt: skip
    log = out.parent / f"{out.name}-{len(list(out.parent.glob('*.stderr')))}.stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "supcon_scale.cli", "train", *args], stdout=subprocess.DEVNULL,
                              stderr=f, env=env, cwd=REPO, timeout=600)  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def runs(small_digits: Path, tmp_path_factory) -> dict:
    """Steps 1-4 of a 6-step run (profiling steps 2-3), then the same out_dir resumed to the end."""
    out = tmp_path_factory.mktemp("watch") / "run"
    first = _train(out, small_digits, "train.max_steps=4", "train.profile_steps=2-3")
    wandb_dirs = sorted((out / "wandb").glob("offline-run-*"))
    second = _train(out, small_digits, "train.resume=auto", "train.allow_changes=train.max_steps")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "first": first, "second": second, "rows": rows, "first_wandb": wandb_dirs}


def test_plain_line_per_window_when_stderr_is_a_file(runs: dict):
    lines = [m for m in map(LINE.match, runs["first"].splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [2, 4]  # log_every=2 of max_steps=4: one line per window
    rows = {r["step"]: r for r in runs["rows"]}
    for m in lines:
        row = rows[int(m.group(1))]
        assert int(m.group(2)) == row["epoch"] and float(m.group(3)) == pytest.approx(row["loss"], abs=1e-4)
        assert float(m.group(4)) == pytest.approx(row["lr"], rel=1e-3)
        shares = [int(m.group(i)) for i in (6, 7, 8)]
        assert shares == [round(100 * row[k]) for k in ("data_share", "compute_share", "optim_share")]
        assert sum(shares) <= 102  # three shares of one wall time (each rounded)
    assert [int(m.group(1)) for m in map(LINE.match, runs["second"].splitlines()) if m] == [6]
    assert "\x1b[" not in runs["first"]  # no terminal control codes in a log file


def test_time_shares_are_shares_of_the_window(runs: dict):
    for row in runs["rows"]:
        parts = [row["data_share"], row["compute_share"], row["optim_share"]]
        assert all(0 <= p <= 1 for p in parts) and sum(parts) <= 1 + 1e-6, row
        assert row["compute_share"] > 0 and row["optim_share"] > 0


def _tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_logged_scalars(runs: dict):
    scalars = _tensorboard_scalars(runs["out"] / "tensorboard")
    for key in ("loss", "lr", "views_per_s", "data_share", "compute_share", "optim_share", "epoch"):
        assert {r["step"]: r[key] for r in runs["rows"]} == pytest.approx(scalars[f"train/{key}"], rel=1e-6), key


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framing (32 KiB blocks; per piece crc32c (4), length (2, little-endian), type (1: full, 2-4: first/middle/last))."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = piece if kind in (1, 2) else pending + piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(run_dir: Path) -> tuple[str, dict[int, dict[str, float]]]:
    (path,) = run_dir.glob("run-*.wandb")
    run_id, history = "", {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[int(items["_step"])] = items
    return run_id, history


def test_wandb_offline_run_holds_them_and_a_resume_keeps_the_id(runs: dict):
    out = runs["out"]
    run_id = (out / sinks.WANDB_ID_FILE).read_text().strip()
    (first,) = runs["first_wandb"]
    later = [d for d in sorted((out / "wandb").glob("offline-run-*")) if d != first]
    assert len(later) == 1 and first.name.endswith(run_id) and later[0].name.endswith(run_id)
    merged = {}
    for d in (first, later[0]):
        got_id, history = _wandb_history(d)
        assert got_id == run_id
        merged.update(history)
    assert sorted(merged) == [r["step"] for r in runs["rows"]] == [2, 4, 6]
    for row in runs["rows"]:
        for key in ("loss", "lr", "views_per_s", "data_share"):
            assert merged[row["step"]][f"train/{key}"] == pytest.approx(row[key], rel=1e-9), key


def test_profile_trace_holds_the_profiled_steps(runs: dict):
    trace = runs["out"] / "profile" / "trace_rank0_steps2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and "step 1" not in names and "step 4" not in names
    assert any(str(n).startswith("aten::convolution") for n in names)  # the model's work is inside
    assert f"profile of steps 2-3: {trace}" in runs["first"]


class Scripted(console.StepClock):
    """A StepClock reading a scripted clock instead of perf_counter."""

    def __init__(self, times: list[float]):
        super().__init__(torch.device("cpu"))
        self.times = iter(times)

    def _now(self) -> float:
        return next(self.times)


def _info(step: int) -> StepInfo:
    return StepInfo(step, 0, torch.tensor(1.0), True, 8, False, False)


def test_step_clock_arithmetic():
    # resume 0 | batch 1, mark 3, stop 4, free 4.5 | batch 5, mark 6, stop 8: wall 8 s
    clock = Scripted([0, 1, 3, 4, 4.5, 5, 6, 8, 9])
    clock.resume()
    for step in (1, 2):
        clock.start()
        clock.mark()
        clock.stop()
        if step == 1:
            clock.wait()
    assert clock.shares() == pytest.approx({"data_share": 1.5 / 8, "compute_share": 3 / 8, "optim_share": 3 / 8})
    clock.wait()  # free at 9; the next window starts at the last stop (8)
    assert clock.shares() == {}  # no step finished since


class Virtual(console.StepClock):
    """A StepClock reading a virtual time that the loader, the model, the optimizer and the hooks advance."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.now = 0.0

    def _now(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Busy(Hook):
    """A hook that takes `batch` virtual seconds in on_batch and `step` in on_step."""

    def __init__(self, clock: Virtual, batch: float, step: float):
        self.clock, self.batch, self.step = clock, batch, step

    def on_batch(self, step: int, views: list[torch.Tensor], labels: torch.Tensor):
        self.clock.advance(self.batch)
        return views, labels

    def on_step(self, info: StepInfo) -> None:
        self.clock.advance(self.step)


@pytest.mark.parametrize("reverse", [False, True], ids=["hooks-in-order", "hooks-reversed"])
def test_the_time_shares_do_not_depend_on_the_hook_order(reverse: bool):
    """The loop as trainer.fit runs it, in virtual seconds: the loader takes 1 a batch, the on_batch hooks 0.5 +
    0.25, the forward 3, the optimizer step 2, the on_step hooks 5 + 7. By hand, over two steps (wall 2 x 6.75 +
    12 = 25.5): data 2 x 1.75, forward+backward 2 x 3, optimizer 2 x 2; the hooks' on_step time is in none."""
    from supcon_scale import config, distributed, engines, models, objectives, trainer

    overrides = ["data.global_batch_size=8", "data.image_size=16", "model.encoder=resnet18", "model.cifar_stem=true",
                 "optim.name=sgd", "train.epochs=1", "train.warmup_epochs=0"]  # fmt: skip
    cfg = config.load(None, overrides)
    ctx = distributed.Context()
    objective = objectives.build(cfg, 10, ctx)
    torch.manual_seed(0)
    engine = engines.build(EngineSpec.from_run(cfg), ctx, models.build(cfg.model, objective.classifier_classes), 10, 0)
    engine.train()
    clock = Virtual()
    engine.unwrapped().register_forward_hook(lambda *_: clock.advance(3.0))  # torch's own module and optimizer hooks
    engine.optimizer.register_step_post_hook(lambda *_: clock.advance(2.0))
    hooks = [Busy(clock, 0.5, 5.0), Busy(clock, 0.25, 7.0)]
    hooks = hooks[::-1] if reverse else hooks

    def loader():
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            clock.advance(1.0)
            yield [torch.rand(8, 3, 16, 16, generator=g) for _ in range(2)], torch.randint(0, 10, (8,), generator=g)

    clock.resume()
    for step, (views, labels) in enumerate(clock.batches(loader()), 1):
        for hook in hooks:
            views, labels = hook.on_batch(step, views, labels)
        _, stepped, _ = trainer.train_step(engine, objective, views, labels, clock)
        assert stepped
        for hook in hooks:
            hook.on_step(_info(step))
    assert clock.shares() == pytest.approx({"data_share": 3.5 / 25.5, "compute_share": 6 / 25.5,
                                            "optim_share": 4 / 25.5})  # fmt: skip


def test_a_failing_sink_warns_once_and_the_log_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    class Broken:
        name = "broken"
        calls = 0

        def write(self, record):
            Broken.calls += 1
            raise OSError("disk quota exceeded")

        def close(self):
            pass

    log = console.MetricsLog(tmp_path / "metrics.jsonl", sinks=[Broken()])
    for step in range(1, 4):
        log.write({"step": step, "loss": 1.0})
    log.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[rank 0] warning: the broken sink failed and is off for the rest of the run: OSError: disk quota "
                   "exceeded"]  # fmt: skip
    assert Broken.calls == 1 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("key, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_extra_is_one_line_naming_it(key: str, module: str, monkeypatch, capsys, tmp_path: Path):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    code = cli.main(["train", "--config", "demo/digits", f"out_dir={tmp_path}", f"log.{key}=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"supcon-scale: config error: log.{key}=true needs the {key} extra: pip install 'supcon_scale[{key}]'"
    ]
    assert not any(tmp_path.iterdir())  # nothing written


def test_warnings_are_one_line_prefixed_with_the_rank(capsys: pytest.CaptureFixture[str]):
    import logging

    with console.rank_stderr(3):
        warnings.warn("mix.* only acts with genscl", UserWarning, stacklevel=1)
        logging.getLogger("supcon_scale.data.sharding").warning("skipping %d undecodable image(s)", 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("[rank 3] warning: ") and "UserWarning: mix.* only acts with genscl" in err[0]
    assert err[1:] == ["[rank 3] warning: skipping 2 undecodable image(s)"]


def test_log_line_fields():
    record = {"step": 120, "epoch": 2, "loss": 5.12345, "lr": 0.48, "views_per_s": 1234.4, "data_share": 0.031,
              "compute_share": 0.85, "optim_share": 0.09, "max_memory_gib": 10.24}  # fmt: skip
    line = console.log_line(record, 3000, eta_s=3723)
    assert line.endswith("step 120/3000 epoch 2 loss 5.1235 lr 0.48 1,234 views/s data 3% fwd+bwd 85% optim 9% "
                         "eta 1:02:03 mem 10.2 GiB")  # fmt: skip


def test_log_line_of_a_knn_row_shows_its_interval_and_n():
    from scipy.stats import binomtest

    ci = binomtest(273, 360).proportion_ci(confidence_level=0.95, method="wilson")  # 75.83% of 360
    record = {"step": 1000, "epoch": 0, "knn_top1": 273 / 360, "knn_top5": 0.99, "knn_num_val": 360, "knn_k": 144,
              "knn_top1_interval_95": [ci.low, ci.high]}  # fmt: skip
    line = console.log_line(record, 3000, eta_s=0)
    assert line.endswith("step 1000/3000 epoch 0 knn top-1 75.83% [71.2, 80.0] (n=360, k=144)")


def test_every_metrics_record_carries_the_time_it_was_written(tmp_path: Path):
    import datetime
    import time

    log, echoed = console.MetricsLog(tmp_path / "metrics.jsonl"), []
    log.echo = echoed.append
    before = time.time()
    for step in (1, 2):
        log.write({"step": step, "loss": 1.0})
    log.write({"step": 2, "epoch": 0, "knn_top1": 0.5})
    after = time.time()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows]
    assert before - 1e-3 <= stamps[0] <= stamps[1] <= stamps[2] <= after + 1e-3
    for r in rows:
        iso = datetime.datetime.fromisoformat(r["time_iso"])
        assert iso.utcoffset() == datetime.timedelta(0) and iso.timestamp() == pytest.approx(r["time"], abs=1e-3)
    assert [e["step"] for e in echoed] == [1, 2, 2] and all("time" not in e for e in echoed)  # sinks: no time key


def test_the_knn_monitor_result_is_on_the_console_line(small_digits: Path, tmp_path: Path, capsys):
    """A training run whose stderr is not a terminal: the monitor's row gets a plain line with its interval and n,
    and the numbers are metrics.jsonl's."""
    import shutil

    from supcon_scale import config, distributed, trainer

    data = tmp_path / "data"  # 8 train and 4 val images per digit: one step, and a kNN over 40 queries
    for split, keep in (("train", 8), ("val", 4)):
        for folder in sorted((small_digits / split).iterdir()):
            (data / split / folder.name).mkdir(parents=True)
            for f in sorted(folder.iterdir())[:keep]:
                shutil.copy(f, data / split / folder.name / f.name)
    overrides = [f"data.root={data}", f"out_dir={tmp_path / 'run'}", "data.global_batch_size=64", "data.image_size=16",
                 "data.backend=torchvision", "data.workers=0", "train.epochs=1", "train.warmup_epochs=0",
                 "train.log_every=2", "train.knn_every_epochs=1", "train.progress=true"]  # fmt: skip
    cfg = config.load(REPO / "supcon_scale/recipes/demo/digits.yaml", overrides)
    capsys.readouterr()
    trainer.fit(cfg, distributed.init(seed=0))
    text = capsys.readouterr().err
    (row,) = [
        r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "knn_top1" in r
    ]
    lo, hi = row["knn_top1_interval_95"]
    want = (f"step {row['step']}/{row['step']} epoch 0 knn top-1 {100 * row['knn_top1']:.2f}% "
            f"[{100 * lo:.1f}, {100 * hi:.1f}] (n={row['knn_num_val']}, k={row['knn_k']})")  # fmt: skip
    assert [line for line in text.splitlines() if " knn top-1 " in line][0].endswith(want), text[-2000:]
    assert row["knn_num_val"] == 40 and row["knn_k"] == 8  # 8 train images per class cap k=200
    assert "knn: k=200 exceeds the 8 train images of class '0' (the smallest); using k=8" in text
