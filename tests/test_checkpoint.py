"""Checkpoints: complete-or-invisible directories, safe loading, purge, RNG and encoder export round trips."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from supcon_scale import checkpoint, config, export, files, models, weights


def _state(seed: int = 0):
    torch.manual_seed(seed)
    cfg = config.load(None, ["model.encoder=resnet18", "model.feat_dim=16"])
    model = models.build(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return (
        cfg,
        model,
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": {}},
    )


def test_save_load_round_trip(tmp_path: Path):
    cfg, model, state = _state()
    path = checkpoint.save(tmp_path, 7, 1, state, cfg.to_dict(), {"epoch": 1, "batch": 3})
    assert path.name == "step_00000007" and checkpoint.latest(tmp_path) == path
    meta, loaded, rank_state = checkpoint.load(path)
    assert meta["step"] == 7 and meta["epoch"] == 1 and meta["world_size"] == 1
    assert meta["loss"]["variant"] == "out" and meta["config"]["model"]["encoder"] == "resnet18"
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    buf = next(iter(state["optimizer"]["state"].values()))["momentum_buffer"]
    assert torch.equal(next(iter(loaded["optimizer"]["state"].values()))["momentum_buffer"], buf)
    assert rank_state["data"] == {"epoch": 1, "batch": 3}


def test_exported_encoder_is_a_plain_timm_state_dict(tmp_path: Path):
    cfg, model, state = _state()
    path = checkpoint.save(tmp_path, 1, 0, state, cfg.to_dict(), {})
    from safetensors.torch import load_file

    # The checkpoint keeps the encoder once (issue 26): model.safetensors only; encoder_from_export reads it there.
    assert sorted(p.name for p in path.glob("*.safetensors")) == ["model.safetensors"]
    exported = export.export_encoder(
        weights.encoder_state(load_file(str(path / "model.safetensors"))),
        tmp_path / "e.safetensors",
        export.encoder_metadata("resnet18"),
    )
    plain = timm.create_model("resnet18", num_classes=0)
    plain.load_state_dict(load_file(str(exported)))  # strict: every key and shape matches
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(plain.eval()(x), model.encoder(x))
    encoder, meta = export.encoder_from_export(path)
    assert meta["encoder"] == "resnet18" and not encoder.training
    torch.testing.assert_close(encoder(x), model.encoder(x))
    # A checkpoint of an older version, with its own encoder.safetensors, still loads (from that file).
    (path / "encoder.safetensors").write_bytes(exported.read_bytes())
    torch.testing.assert_close(export.encoder_from_export(path)[0](x), model.encoder(x))


def test_incomplete_checkpoint_is_invisible_and_purge_keeps_newest(tmp_path: Path):
    cfg, _, state = _state()
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, 0, state, cfg.to_dict(), {}, keep_last=2)
    root = checkpoint.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    # A save killed before meta.json: the directory exists under its final name but is never picked.
    half = root / "step_00000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "step_00000004"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.load(half)


def test_refuses_arbitrary_pickles(tmp_path: Path):
    cfg, _, state = _state()
    path = checkpoint.save(tmp_path, 1, 0, state, cfg.to_dict(), {})

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"optimizer": Evil()}, path / "train_state.pt")
    with pytest.raises(ValueError, match=r"train_state.pt: refused to load"):
        checkpoint.load(path)


def test_mismatched_model_names_keys_and_shapes(tmp_path: Path):
    enc = models.create_encoder("resnet18")
    path = export.export_encoder(enc, tmp_path / "encoder.safetensors", export.encoder_metadata("resnet18"))
    target = models.create_encoder("resnet34")
    from safetensors.torch import load_file

    with pytest.raises(ValueError, match=r"does not fit this model: missing layer1.2.*"):
        weights.load_matching(target, load_file(str(path)), str(path))
    narrow = timm.create_model("resnet18", num_classes=0, stem_width=32, stem_type="deep")
    with pytest.raises(ValueError, match=r"unexpected conv1.weight"):
        weights.load_matching(narrow, load_file(str(path)), str(path))


def test_rng_state_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = checkpoint.rng_state()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_meta_is_plain_json(tmp_path: Path):
    cfg, _, state = _state()
    path = checkpoint.save(tmp_path, 1, 0, state, cfg.to_dict(), {})
    meta = json.loads((path / "meta.json").read_text())
    assert config.from_dict(meta["config"]) == cfg


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_trained_checkpoint_exports_its_stem(tmp_path: Path, cifar_stem: bool):
    """checkpoint.save exports the encoder with the run's `model.cifar_stem`; encoder_from_export rebuilds it."""
    cfg = config.load(None, ["model.encoder=resnet18", f"model.cifar_stem={str(cifar_stem).lower()}"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    state = {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}}
    path = checkpoint.save(tmp_path, 1, 0, state, cfg.to_dict(), {})
    encoder, meta = export.encoder_from_export(path)
    assert meta["cifar_stem"] == str(int(cifar_stem))
    conv1 = encoder.conv1
    assert (conv1.kernel_size, conv1.stride) == (((3, 3), (1, 1)) if cifar_stem else ((7, 7), (2, 2)))
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, model.encoder.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------------------------
# One writer per out_dir (issue 15): lock.json


def _holder(lock: files.OutDirLock, **fields) -> None:
    record = {"host": "other-host", "pid": 1, "started": time.time() - 5, "heartbeat": time.time(), "job": {}}
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(json.dumps({**record, **fields}))


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_one(tmp_path: Path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = files.OutDirLock(tmp_path)
        _holder(lock, host=socket.gethostname(), pid=sleeper.pid, pid_start=files._pid_start(sleeper.pid))
        refusal = lock.acquire()
        assert refusal is not None and "\n" not in refusal
        assert f"in use by another trainer (host {socket.gethostname()}, pid {sleeper.pid}," in refusal
        assert json.loads(lock.path.read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.acquire() is None  # its holder is dead: taken over
    held = json.loads(lock.path.read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid()) and lock.owned()
    lock.release()
    assert not lock.path.exists()


def test_lock_on_another_host_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path: Path):
    lock = files.OutDirLock(tmp_path)
    _holder(lock, heartbeat=time.time() - 10)
    assert "host other-host, pid 1," in lock.acquire()
    _holder(lock, heartbeat=time.time() - files.STALE_S - 1)
    assert lock.acquire() is None
    lock.release()
    lock.path.write_text("{trunc")  # a writer killed mid-write, long ago: dated by the file's mtime
    os.utime(lock.path, (time.time() - files.STALE_S - 1,) * 2)
    assert lock.acquire() is None
    lock.release()


def test_lock_of_an_earlier_torchrun_attempt_is_taken_over(tmp_path: Path, monkeypatch):
    job = {"TORCHELASTIC_RUN_ID": "job-42", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    for name, value in {**job, "TORCHELASTIC_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(name, value)
    lock = files.OutDirLock(tmp_path)
    earlier = {"run_id": "job-42", "store": "10.0.0.1:29500", "restart": 0}
    # rank 0 of attempt 0 ran on another host, whose heartbeat is still fresh: attempt 1 is the same job
    _holder(lock, job=earlier)
    assert lock.acquire() is None
    lock.release()
    # the same attempt number (a requeued job overlapping one still alive) or another job is not taken over
    for other in ({**earlier, "restart": 1}, {**earlier, "run_id": "job-43"}, {**earlier, "store": "10.0.0.2:29500"}):
        _holder(lock, job=other)
        assert lock.acquire() is not None, other
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id identifies nothing
    _holder(lock, job={**earlier, "run_id": "none"})
    assert lock.acquire() is not None
