"""Issue 7: each fault injected for real (SIGKILL, signals, a save killed half-way, NaN, bad files and configs).

Every multi-rank run is a real `torchrun` (through `supcon-scale torchrun`) of the real CLI on gloo, with a hard
timeout. A 2-rank uninterrupted run that keeps a checkpoint after every step is the reference: a run that survived a
fault must hold bit-identical weights, data positions and RNG states at the same step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from supcon_scale import checkpoint, config, distributed, files, trainer
from supcon_scale.hooks import Hook

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for any one subprocess; the test kills it after that


@pytest.fixture(scope="module")
def digits(small_digits: Path) -> Path:
    return small_digits


def _overrides(digits: Path, out: Path, *extra: str) -> list[str]:
    return [
        # torchvision: its data position is plain integers to compare; DALI's resume has its own tests
        "--config",
        "demo/digits",
        f"data.root={digits}",
        f"out_dir={out}",
        "data.global_batch_size=64",
        "data.image_size=16",
        "data.backend=torchvision",
        "train.epochs=2",
        "train.warmup_epochs=1",
        "train.log_every=1",
        "train.progress=false",
        *extra,
    ]


def _cfg(digits: Path, out: Path, *extra: str) -> config.RunConfig:
    return config.load(REPO / "supcon_scale/recipes/demo/digits.yaml", _overrides(digits, out, *extra)[2:])


def _env(faults: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}
    env.pop("SUPCON_FAULTS", None)
    if faults:
        env["SUPCON_FAULTS"] = faults
    return env


# The CLI with the fault hook of tests/faults.py (it reads $SUPCON_FAULTS; the package itself has no such switch).
FAULTS_ENTRY = str(REPO / "tests" / "faults.py")


def _torchrun_cmd(digits: Path, out: Path, *extra: str, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "supcon_scale.cli",
        "torchrun",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(max_restarts),
        FAULTS_ENTRY,
        "train",
        *_overrides(digits, out, *extra),
    ]


def _run(cmd: list[str], faults: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(faults), cwd=REPO, timeout=TIMEOUT)


def _popen(cmd: list[str], faults: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(faults), cwd=REPO)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _worker_pid(agent: int, rank: int) -> int:
    for pid in _children(agent):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {agent}")


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if any(r["step"] == step for r in _metrics(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before step {step}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} never reached")


def _step_dir(out: Path, step: int) -> Path:
    return checkpoint.checkpoint_root(out) / f"step_{step:08d}"


def _assert_same_checkpoint(got: Path, ref: Path) -> None:
    """Bit-identical model, optimizer state, LR schedule, step, and every rank's data position."""
    a, b = load_file(str(got / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (got, ref))
    assert (ma["step"], ma["epoch"], ma["world_size"]) == (mb["step"], mb["epoch"], mb["world_size"])
    for rank in range(mb["world_size"]):
        ra, rb = (torch.load(p / f"rank_{rank}.pt", weights_only=True) for p in (got, ref))
        assert ra["data"] == rb["data"], rank
        # (not the global torch RNG: each `iter(DataLoader)` draws a base seed from it, so a resumed process is one
        # draw apart; augmentation uses per-sample seeds and does not read it)
    oa, ob = (torch.load(p / "train_state.pt", weights_only=True) for p in (got, ref))
    assert oa["scheduler"] == ob["scheduler"]
    assert oa["optimizer"]["state"].keys() == ob["optimizer"]["state"].keys()
    for s, t in zip(oa["optimizer"]["state"].values(), ob["optimizer"]["state"].values(), strict=True):
        for key in s:
            assert torch.equal(s[key], t[key]) if torch.is_tensor(s[key]) else s[key] == t[key]


@pytest.fixture(scope="module")
def reference(digits: Path, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run, with a checkpoint after every one of its 6 steps."""
    out = tmp_path_factory.mktemp("reference")
    proc = _run(_torchrun_cmd(digits, out, "train.checkpoint_every_steps=1", "train.keep_last=100"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5, 6]
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. A rank SIGKILLed mid-epoch under torchrun --max-restarts 1


def test_killed_rank_restarts_from_newest_checkpoint_and_matches(digits: Path, reference: Path, tmp_path: Path):
    proc = _run(
        _torchrun_cmd(digits, tmp_path, "train.checkpoint_every_steps=2", "train.resume=auto", max_restarts=1),
        faults="kill_rank=1@5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exitcode: -9" in proc.stderr  # torchrun saw the kill and restarted the group
    # Step 5 ran, rank 1 died before its save; the second attempt resumed at step 4 (mid-epoch 1) and redid step 5.
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 5, 6]
    resumed_from = torch.load(_step_dir(reference, 4) / "rank_1.pt", weights_only=True)["data"]
    assert (resumed_from["epoch"], resumed_from["batch"]) == (1, 1)
    _assert_same_checkpoint(checkpoint.latest(tmp_path), _step_dir(reference, 6))
    torch.testing.assert_close(
        load_file(str(tmp_path / "encoder.safetensors")),
        load_file(str(reference / "encoder.safetensors")),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Preemption: a signal to the torchrun agent, then SIGTERM to one worker pid; both checkpoint and exit 3.
# The ranks hold after the step to preempt until the signal has reached them (tests/faults.py `hold`), so the
# preempted step is decided by the test, never by how fast this machine is.


def _preempt_via_agent(digits: Path, out: Path, name: str) -> str:
    """Start a 2-rank run, send `name` to its agent once step 2 is logged; returns the agent's stderr (exit 3)."""
    over = (f"train.preempt_signal={name}", "train.resume=auto")
    proc = _popen(_torchrun_cmd(digits, out, *over), f"hold={name}@2")
    _wait_for_step(out, 2, proc)
    proc.send_signal(getattr(signal, name))
    _, err = _finish(proc)
    assert proc.returncode == 3, err[-3000:]
    return err


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGTERM"])
def test_other_preemption_signals_to_the_agent_checkpoint_and_exit_3(
    digits: Path, reference: Path, tmp_path: Path, name: str
):
    """SLURM's --signal=B:USR2 and a scheduler's SIGTERM to the agent are forwarded like SIGUSR1 (below)."""
    err = _preempt_via_agent(digits, tmp_path, name)
    assert "preempted at step 2" in err and "exit 3 (requeue)" in err
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    _assert_same_checkpoint(_step_dir(tmp_path, 2), _step_dir(reference, 2))


def test_preemption_via_agent_and_via_worker_exit_3_and_resume_exactly(digits: Path, reference: Path, tmp_path: Path):
    # SLURM's --signal=B:USR1 reaches the agent; supcon-scale torchrun forwards it to the workers.
    err = _preempt_via_agent(digits, tmp_path, "SIGUSR1")
    assert "preempted at step 2" in err and "exit 3 (requeue)" in err
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]  # checkpoint at the next step boundary, then stop
    assert checkpoint.latest(tmp_path) == _step_dir(tmp_path, 2)
    _assert_same_checkpoint(_step_dir(tmp_path, 2), _step_dir(reference, 2))

    # Requeued: resume, and this time SIGTERM reaches rank 1 only. The ranks agree on it (all-reduce), both save
    # step 4, and the worker stops its agent, so --max-restarts 1 does not restart a preempted job.
    proc = _popen(_torchrun_cmd(digits, tmp_path, "train.resume=auto", max_restarts=1), "hold=SIGTERM@4:1")
    _wait_for_step(tmp_path, 4, proc)
    os.kill(_worker_pid(proc.pid, rank=1), signal.SIGTERM)
    _, err = _finish(proc)
    assert proc.returncode == 3, err[-3000:]
    assert "preempted at step 4" in err
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]
    _assert_same_checkpoint(checkpoint.latest(tmp_path), _step_dir(reference, 4))


# ---------------------------------------------------------------------------------------------------------------
# 3. A process killed in the middle of a save


def test_crash_during_save_keeps_previous_checkpoint_and_keep_last(digits: Path, reference: Path, tmp_path: Path):
    extra = ("train.checkpoint_every_steps=2", "train.keep_last=2", "train.resume=auto")
    proc = _run(_torchrun_cmd(digits, tmp_path, *extra), faults="die_in_save=4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    root = checkpoint.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000004", "step_00000002", "step_00000003"]
    partial = sorted(p.name for p in (root / ".tmp-step_00000004").iterdir())
    assert "model.safetensors" in partial and "meta.json" not in partial  # killed after the weights, before meta
    assert checkpoint.latest(tmp_path) == root / "step_00000003"  # auto never picks the partial one
    _assert_same_checkpoint(root / "step_00000003", _step_dir(reference, 3))  # the previous one is intact

    proc = _run(_torchrun_cmd(digits, tmp_path, *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]  # keep_last=2, tmp purged
    _assert_same_checkpoint(root / "step_00000004", _step_dir(reference, 4))
    _assert_same_checkpoint(root / "step_00000006", _step_dir(reference, 6))


# ---------------------------------------------------------------------------------------------------------------
# 4. Non-finite loss


def test_nan_steps_are_skipped_counted_then_stop_the_run(digits: Path, tmp_path: Path):
    cmd = [
        sys.executable,
        FAULTS_ENTRY,
        "train",
        *_overrides(digits, tmp_path, "train.epochs=3", "train.max_bad_steps=3"),
    ]
    proc = _run(cmd, faults="nan_steps=2-3,5-7")
    assert proc.returncode == 1, proc.stderr[-3000:]
    newest = _step_dir(tmp_path, 6)
    assert f"step 7: 3 non-finite steps in a row (loss=nan); newest good checkpoint: {newest}" in proc.stderr
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 2, 3, 4]
    # Skipped steps do not advance the schedule: linear warm-up over 3 steps to 1.0 x 64/256 (LR = base x batch / 256).
    peak = _cfg(digits, tmp_path).optim.base_lr * 64 / 256
    assert [r["lr"] for r in rows[:4]] == pytest.approx([peak * 2 / 3] * 3 + [peak])
    assert checkpoint.latest(tmp_path) == newest
    assert all(torch.isfinite(v).all() for v in load_file(str(newest / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------------------
# 5. World size change on resume (issue 15): the position is global, so 2 ranks' checkpoint continues on 1


def test_resume_on_another_world_size_continues_the_epoch(digits: Path, reference: Path, tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(_step_dir(reference, 4), tmp_path / "checkpoints/step_00000004")
    ctx = distributed.init(seed=0)
    seen = []

    class Labels(Hook):
        def on_batch(self, step, views, labels):
            seen.append(labels.clone())
            return views, labels

    result = trainer.fit(_cfg(digits, tmp_path, "train.resume=auto"), ctx, hooks=[Labels()])
    assert result.step == 6 and [r["step"] for r in _metrics(tmp_path)] == [5, 6]
    # One rank trains on both ranks' shares of steps 5-6: the labels of the 2-rank run's last two global batches.
    data = json.loads((_step_dir(reference, 6) / "meta.json").read_text())["config"]["data"]
    assert [len(b) for b in seen] == [data["global_batch_size"]] * 2
    meta = json.loads((checkpoint.latest(tmp_path) / "meta.json").read_text())
    assert (meta["step"], meta["world_size"]) == (6, 1)


def test_resume_refuses_what_cannot_continue_exactly(digits: Path, reference: Path, tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints/step_00000004"
    shutil.copytree(_step_dir(reference, 4), ckpt)
    ctx = distributed.init(seed=0)
    # Another global batch: the saved position counts steps of 64 samples.
    allow = "train.allow_changes=data.global_batch_size"  # past the config comparison, to the data position's check
    cfg = _cfg(digits, tmp_path, "train.resume=auto", "data.global_batch_size=32", allow)
    with pytest.raises(ValueError, match=r"step_00000004: data position was saved with data.global_batch_size=64"):
        trainer.fit(cfg, ctx)
    # A position written before positions were global (no global batch in it) resumes on its own world size only.
    rank0 = torch.load(ckpt / "rank_0.pt", weights_only=True)
    rank0["data"].pop("global_batch")
    torch.save(rank0, ckpt / "rank_0.pt")
    with pytest.raises(ValueError, match=r"saved with world size 2 but this run has world size 1; it predates global"):
        trainer.fit(_cfg(digits, tmp_path, "train.resume=auto"), ctx)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004"]
    assert _metrics(tmp_path) == []  # nothing trained: no silent restart from epoch 0


# ---------------------------------------------------------------------------------------------------------------
# 5b. One writer per out_dir (issue 15)


def test_second_trainer_on_a_live_out_dir_refuses_then_takes_over_once_it_died(digits: Path, tmp_path: Path):
    cmd = [sys.executable, FAULTS_ENTRY, "train", *_overrides(digits, tmp_path, "train.resume=auto")]
    first = _popen(cmd, "hold=SIGTERM@1")  # alive until killed below
    try:
        _wait_for_step(tmp_path, 1, first)
        ctx = distributed.init(seed=0)
        with pytest.raises(ValueError) as info:
            trainer.fit(_cfg(digits, tmp_path, "train.resume=auto"), ctx)
        message = str(info.value)
        assert "\n" not in message
        assert f"in use by another trainer (host {socket.gethostname()}, pid {first.pid}," in message
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        _finish(first)
    # Killed: its lock stays behind, naming a dead process, and the next trainer takes it over and resumes.
    assert json.loads((tmp_path / files.LOCK).read_text())["pid"] == first.pid
    result = trainer.fit(_cfg(digits, tmp_path, "train.resume=auto"), distributed.init(seed=0))
    assert result.step == 6 and not (tmp_path / files.LOCK).exists()  # released at the end


# ---------------------------------------------------------------------------------------------------------------
# 6. Bad input


def test_older_config_keys_name_their_new_name(tmp_path: Path):
    old = tmp_path / "old.yaml"
    old.write_text("base: " + str(REPO / "supcon_scale/recipes/demo/digits.yaml") + "\ntrain:\n  save_freq: 50\n")
    with pytest.raises(
        config.ConfigError, match=r"^config key train.save_freq was renamed to train.checkpoint_every_steps"
    ):
        config.load(old)
    with pytest.raises(config.ConfigError, match=r"^config key loss.temp was renamed to loss.temperature"):
        config.load(None, ["loss.temp=0.1"])


@pytest.fixture(scope="module")
def one_step(digits: Path, tmp_path_factory) -> Path:
    """A 1-process checkpoint after one step, with a 32-wide projection."""
    out = tmp_path_factory.mktemp("one_step")
    cfg = _cfg(digits, out, "train.max_steps=1", "model.feat_dim=32")
    trainer.fit(cfg, distributed.init(seed=0))
    return checkpoint.latest(out)


def test_checkpoint_of_another_model_names_keys_and_shapes(digits: Path, one_step: Path, tmp_path: Path):
    # allowed, so that the shapes are what refuses it (without it, the config comparison names model.feat_dim)
    extra = ("train.max_steps=1", "model.feat_dim=16", "train.allow_changes=model.feat_dim")
    cfg = _cfg(digits, tmp_path, f"train.resume={one_step}", *extra)
    with pytest.raises(ValueError) as info:
        trainer.fit(cfg, distributed.init(seed=0))
    message = str(info.value)
    assert f"checkpoint {one_step} does not fit this model: shape mismatch" in message
    assert "head." in message and "(32, 512) vs (16, 512)" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_needing_arbitrary_unpickling_is_refused(digits: Path, one_step: Path, tmp_path: Path):
    ckpt = tmp_path / "checkpoints" / one_step.name
    shutil.copytree(one_step, ckpt)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"rng": Payload(), "data": {}}, ckpt / "rank_0.pt")
    cfg = _cfg(digits, tmp_path, "train.resume=auto", "model.feat_dim=32", "train.max_steps=1")
    with pytest.raises(ValueError, match=r"rank_0.pt: refused to load \(Weights only load failed"):
        trainer.fit(cfg, distributed.init(seed=0))
    assert not marker.exists()  # the pickle's code never ran
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [one_step.name]


def test_empty_or_single_class_dataset_is_refused(digits: Path, tmp_path: Path):
    ctx = distributed.init(seed=0)

    def fit(root: Path, *extra: str):
        out = tmp_path / f"out_{root.name}_{len(extra)}"
        return trainer.fit(_cfg(root, out, "data.global_batch_size=16", *extra), ctx), out

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data.root: no class folders in .*empty$"):
        fit(tmp_path / "empty")
    (tmp_path / "no_images/cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^data.root: no images under .*no_images$"):
        fit(tmp_path / "no_images")
    single = tmp_path / "single"
    shutil.copytree(digits / "train/3", single / "3")
    with pytest.raises(ValueError, match=r"^data.root: .*single has a single class; loss.name=supcon needs at least 2"):
        fit(single)
    with pytest.raises(ValueError, match=r"loss.name=cross_entropy needs at least 2"):
        fit(single, "loss.name=cross_entropy")
    assert not any(p.name.startswith("out_") and (p / "checkpoints").exists() for p in tmp_path.iterdir())
    # SimCLR ignores labels: one folder of unlabelled images is a valid dataset for it.
    result, out = fit(single, "loss.name=simclr", "train.max_steps=1")
    assert result.step == 1 and checkpoint.latest(out).name == "step_00000001"


@pytest.mark.parametrize(
    "module, override, extra",
    [
        ("deepspeed", "engine.name=deepspeed engine.zero_stage=0", "deepspeed"),
        ("nvidia.dali", "data.backend=dali", "dali"),
    ],
)
def test_missing_extra_names_the_pip_install(digits: Path, tmp_path: Path, module: str, override: str, extra: str):
    args = ["train", *_overrides(digits, tmp_path, *override.split())]
    code = f"import sys; sys.modules[{module!r}] = None; from supcon_scale.cli import main; sys.exit(main({args!r}))"
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install supcon_scale[{extra}]" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
