"""Continual runs end to end on tiny streams: resume (mid-task and at a task boundary) equals an uninterrupted run,
2 gloo ranks equal one process on the global batch, and the `continual` command's summary, plots and errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from safetensors.torch import load_file

from supcon_scale import checkpoint, cli, files
from supcon_scale.continual import config as ccfg
from supcon_scale.continual import learner
from supcon_scale.continual.learner import fit, run_dir
from supcon_scale.distributed import Context
from supcon_scale.hooks import Hook
from supcon_scale.resilience import Preempted

# 4 digits in 2 tasks, 4 incoming + 8 memory samples a step (12 steps a task), a reduced ResNet-18 of width 4 at 16 px
STEPS_PER_TASK = 12


def tiny(out_dir: Path, data_root: Path, *extra: str) -> ccfg.ContinualConfig:
    return ccfg.load(
        None,
        [
            f"out_dir={out_dir}",
            f"data.root={data_root}",
            "data.image_size=16",
            "stream.tasks=2",
            "stream.class_order=[0, 1, 2, 3]",
            "stream.batch_size=4",
            "memory.size=12",
            "memory.batch_size=8",
            "model.width=4",
            "model.feat_dim=16",
            "model.sync_bn=true",
            "optim.lr=0.05",
            "optim.momentum=0.9",
            "train.progress=false",
            "seeds=[0]",
            *extra,
        ],
    )


def final_state(cfg: ccfg.ContinualConfig, method: str, rank: int = 0) -> tuple[dict, dict]:
    """The last checkpoint's weights and this rank's memory, as written to disk."""
    newest = checkpoint.latest(run_dir(cfg, method, 0))
    assert newest is not None and newest.name == f"step_{2 * STEPS_PER_TASK:08d}"
    rank_state = torch.load(newest / f"rank_{rank}.pt", weights_only=True)
    return load_file(str(newest / "model.safetensors")), rank_state["data"]["memory"]


def memory_bytes(memory: dict) -> dict[int, bytes]:
    raw = np.asarray(memory["bytes"]).tobytes()
    off = np.asarray(memory["offsets"]).tolist()
    return {int(s): raw[off[k] : off[k + 1]] for k, s in enumerate(np.asarray(memory["slots"]).tolist())}


class Crash(Hook):
    """A fault: the process dies right after step `at` (its hook runs after that step's checkpoint, if any)."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, info) -> None:
        if info.step == self.at:
            raise RuntimeError(f"injected crash after step {info.step}")


@pytest.mark.parametrize("method, crash_at, resumed_from", [("scr", 7, 5), ("er", 13, 12)])
def test_resume_gives_the_same_memory_and_weights_as_an_uninterrupted_run(
    tmp_path, small_digits, method, crash_at, resumed_from
):
    """SCR crashes mid-task (step 7, newest checkpoint 5), ER just after a task boundary (13, newest 12)."""
    reference = tiny(tmp_path / "ref", small_digits, f"methods=[{method}]")
    expected = fit(reference, method, 0, Context())
    cfg = tiny(
        tmp_path / "run", small_digits, f"methods=[{method}]", "train.checkpoint_every_steps=5", "train.resume=auto"
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        fit(cfg, method, 0, Context(), hooks=[Crash(crash_at)])
    assert checkpoint.latest(run_dir(cfg, method, 0)).name == f"step_{resumed_from:08d}"
    resumed = fit(cfg, method, 0, Context())

    weights, memory = final_state(cfg, method)
    ref_weights, ref_memory = final_state(reference, method)
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    for k in ("index", "labels", "owner", "slots", "offsets", "bytes"):
        assert torch.equal(memory[k], ref_memory[k]), k
    for k in ("filled", "seen", "reservoir_rng", "retrieve_rng"):
        assert memory[k] == ref_memory[k], k
    assert memory["filled"] == 12 and memory["seen"] == 2 * STEPS_PER_TASK * 4
    assert resumed.matrix == expected.matrix and resumed.steps == expected.steps == 2 * STEPS_PER_TASK


def _ranked(rank: int, world: int, out_dir: str, data_root: str, method: str) -> dict:
    cfg = tiny(Path(out_dir), Path(data_root), f"methods=[{method}]", "model.dtype=float64")
    result = fit(cfg, method, 0, Context(rank=rank, world_size=world, local_rank=rank))
    weights, memory = final_state(cfg, method, rank)
    # plain arrays: tensors sent through the queue would live in shared memory that dies with the rank
    plain = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in memory.items()}
    return {"matrix": result.matrix, "weights": {k: v.numpy() for k, v in weights.items()}, "memory": plain}


@pytest.mark.parametrize("method", ["scr", "er"])
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, small_digits, method):
    """Each rank trains on its half of the incoming batch and the memory slots it holds; SupCon gathers the
    contrast set, ER sums over the global counts, batch norm is global: the same weights, memory and accuracy
    matrix as one process."""
    # the reference in a worker too: one thread, like the ranks (torch's reductions in the colour jitter round
    # differently with another thread count, which moves a uint8 pixel now and then)
    (one,) = run_ranks(_ranked, 1, str(tmp_path / "one"), str(small_digits), method)
    two = run_ranks(_ranked, 2, str(tmp_path / "two"), str(small_digits), method)
    # float64: the sums run in another order (gathered contrast set, global batch norm, DDP's mean) but agree to
    # ~1e-11. In float32 ER's tiny network amplifies those rounding differences chaotically over 24 steps (float64
    # shows the growth: 1e-16 -> 1e-11), so float32 weights could not be compared tightly.
    for k, v in one["weights"].items():
        scale = float(np.abs(v).max()) if v.size else 0.0
        assert float(np.abs(two[0]["weights"][k] - v).max(initial=0.0)) <= 1e-8 * scale + 1e-12, k
    for r in range(2):  # the slot table is replicated ...
        for k in ("index", "labels"):
            assert np.array_equal(two[r]["memory"][k], one["memory"][k]), k
        assert np.array_equal(two[r]["memory"]["owner"], two[0]["memory"]["owner"])
    shards = [memory_bytes(two[r]["memory"]) for r in range(2)]
    assert set(shards[0]).isdisjoint(shards[1]) and shards[0] and shards[1]  # ... the bytes are sharded
    assert {**shards[0], **shards[1]} == memory_bytes(one["memory"])
    owner = two[0]["memory"]["owner"]
    assert set(np.flatnonzero(owner == 1).tolist()) == set(shards[1])
    assert two[0]["matrix"] == two[1]["matrix"] == one["matrix"]


@pytest.mark.slow  # the command end to end (3 minutes on a loaded 2-core machine); the parts are tested above
def test_continual_command_writes_summary_plots_and_intervals(tmp_path, small_digits, capsys):
    out = tmp_path / "cmd"
    args = [
        f"out_dir={out}",
        f"data.root={small_digits}",
        "data.image_size=16",
        "stream.tasks=2",
        "stream.class_order=[0, 1, 2, 3]",
        "stream.batch_size=4",
        "memory.size=12",
        "memory.batch_size=8",
        "model.width=4",
        "model.feat_dim=16",
        "train.progress=false",
        "seeds=[0, 1]",
        "train.resume=auto",
    ]
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out.mkdir()
    for name in ("summary.json", "accuracy_matrix.png"):  # planted links are replaced, their target never written
        (out / name).symlink_to(target)
    assert cli.main(["continual", *args]) == 0
    assert target.read_text() == "keep me" and not (out / "summary.json").is_symlink()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"scr", "er"} and len(summary["runs"]) == 4
    assert len(summary["paired_difference"]["scr_minus_er_final_average_accuracy"]["per_seed"]) == 2
    for entry in summary["methods"].values():
        final = entry["final_average_accuracy"]
        assert 0 <= final["mean"] <= 1 and final["ci95"] >= 0 and len(final["per_seed"]) == 2
        assert len(entry["stage_accuracy"]) == 2 and entry["mean_matrix"][0][1] is None
    for plot in ("accuracy_matrix.png", "stage_accuracy.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "scr" / "seed_1" / "result.json").read_text()
    assert cli.main(["continual", *args]) == 0  # resume=auto: finished runs are kept, not trained again
    assert (out / "scr" / "seed_1" / "result.json").read_text() == before
    assert "finished before, result kept" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["stream.tasks=5"], "stream.tasks=5 leaves 1 task(s) without classes"),
        (["memory.size=97"], "memory.size=97 is larger than the stream: it brings 96 training samples"),
        (["stream.class_order=[0, 1, seven]"], "stream.class_order names unknown classes 'seven'"),
    ],
)
def test_continual_command_bad_input_is_one_line_naming_the_key(tmp_path, small_digits, capsys, extra, message):
    args = [
        f"out_dir={tmp_path}",
        f"data.root={small_digits}",
        "stream.tasks=2",
        "stream.class_order=[0, 1, 2, 3]",
        "stream.batch_size=4",
        "memory.size=12",
        *extra,
    ]
    assert cli.main(["continual", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


@pytest.mark.slow  # about a minute; the deepspeed engine itself is checked against one process in test_engines.py
def test_deepspeed_engine_trains_as_ddp(tmp_path, small_digits, monkeypatch):
    """engine.name=deepspeed (ZeRO-1, one process) gives the weights and matrix of the ddp engine."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    runs = {}
    for engine in ("ddp", "deepspeed"):
        cfg = tiny(tmp_path / engine, small_digits, "methods=[scr]", f"engine.name={engine}", "engine.zero_stage=1")
        runs[engine] = (fit(cfg, "scr", 0, Context()).matrix, final_state(cfg, "scr")[0])
    assert runs["ddp"][0] == runs["deepspeed"][0]
    for k, v in runs["ddp"][1].items():
        torch.testing.assert_close(runs["deepspeed"][1][k], v, rtol=1e-4, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# On the trainer's stack: skipped steps, sinks, the out_dir lock

ONE_TASK = ("stream.tasks=1", "stream.class_order=[0, 1]")  # 12 steps, one evaluation: the shortest run


class Poison(Hook):
    """Puts a NaN into step `at`'s batch (a non-finite loss: the step is skipped) and copies the model's float
    buffers (batch-norm running statistics) before that step, after it, and after the next one."""

    def __init__(self, at: int):
        self.at, self.model, self.buffers, self.stepped = at, None, {}, {}

    def _copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_buffers() if v.is_floating_point()}

    def on_batch(self, step, views, labels):
        if step == self.at:
            self.buffers["before"] = self._copy()
            views = [v.clone() for v in views]
            views[0][0] = float("nan")
        return views, labels

    def on_step(self, info) -> None:
        if info.step in (self.at, self.at + 1):
            self.buffers[info.step] = self._copy()
            self.stepped[info.step] = info.stepped


def test_a_skipped_scr_step_leaves_batch_norm_statistics_unchanged(tmp_path, small_digits):
    cfg = tiny(tmp_path, small_digits, "methods=[scr]", *ONE_TASK)
    probe = Poison(at=3)
    parts = learner.build(cfg, "scr", 0, Context(), hooks=[probe])
    probe.model = parts.loop.engine.unwrapped()
    result = learner.train(parts)
    assert probe.stepped == {3: False, 4: True} and result.skipped_steps == 1
    before, skipped, next_step = probe.buffers["before"], probe.buffers[3], probe.buffers[4]
    assert any("running_mean" in k for k in before) and before.keys() == skipped.keys()
    for k, v in before.items():
        assert torch.equal(skipped[k], v), k  # the NaN forward's statistics were put back
    assert any(not torch.equal(next_step[k], v) for k, v in before.items())  # a good step does move them
    assert all(bool(torch.isfinite(v).all()) for v in next_step.values())


def test_continual_run_writes_tensorboard_and_wandb_when_asked(tmp_path, small_digits, monkeypatch):
    from test_console import _tensorboard_scalars, _wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    log = ("log.tensorboard=true", "log.wandb=true", "train.log_every=4")
    cfg = tiny(tmp_path, small_digits, "methods=[er]", *ONE_TASK, *log)
    fit(cfg, "er", 0, Context())
    where = run_dir(cfg, "er", 0)
    rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    (accuracy,) = [r for r in rows if "accuracy" in r]
    assert sorted(losses) == [4, 8, 12] and accuracy["step"] == 12
    scalars = _tensorboard_scalars(where / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert scalars["train/stage_accuracy"] == pytest.approx({12: accuracy["accuracy"][0]})
    (wandb_run,) = (where / "wandb").glob("offline-run-*")
    _, history = _wandb_history(wandb_run)
    assert {s: h["train/loss"] for s, h in history.items() if "train/loss" in h} == pytest.approx(losses, rel=1e-6)


def test_continual_run_takes_the_out_dir_lock(tmp_path, small_digits):
    """A second run on a run directory another live job holds is refused, naming that job; nothing is trained."""
    cfg = tiny(tmp_path, small_digits, "methods=[er]", *ONE_TASK)
    where = run_dir(cfg, "er", 0)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = files.OutDirLock(where)
        where.mkdir(parents=True)
        holder = {"host": socket.gethostname(), "pid": sleeper.pid, "pid_start": files._pid_start(sleeper.pid)}
        lock.path.write_text(json.dumps({**holder, "started": time.time(), "heartbeat": time.time(), "job": {}}))
        with pytest.raises(ValueError) as info:
            fit(cfg, "er", 0, Context())
        message = str(info.value)
        assert f"in use by another trainer (host {socket.gethostname()}, pid {sleeper.pid}," in message
        assert "\n" not in message and json.loads(lock.path.read_text())["pid"] == sleeper.pid
        assert checkpoint.latest(where) is None and not (where / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


class Signal(Hook):
    """A preemption notice (SIGTERM to this process) during step `at`, as SLURM sends it."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, info) -> None:
        if info.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_preempted_continual_run_saves_that_step_through_the_checkpointer(tmp_path, small_digits):
    cfg = tiny(tmp_path, small_digits, "methods=[scr]", *ONE_TASK)
    with pytest.raises(Preempted) as info:
        fit(cfg, "scr", 0, Context(), hooks=[Signal(3)])
    newest = checkpoint.latest(run_dir(cfg, "scr", 0))
    assert info.value.step == 3 and newest.name == "step_00000003" and str(newest) in str(info.value)
    data = torch.load(newest / "rank_0.pt", weights_only=True)["data"]
    assert data["step"] == 3 and data["memory"]["seen"] == 3 * 4 and json.loads(data["rows"]) == []
