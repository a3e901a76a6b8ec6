"""The bad-input matrix (issue 20): hostile and careless files, configs and environments, each through the CLI.

Every row asserts the exit status, the one-line message naming the culprit (the key, the file, the variable), no
traceback, and what is on disk afterwards: nothing overwritten, nothing written outside `out_dir`, link targets
untouched. docs/RELIABILITY.md "Hostile input" lists the rows. Training rows use the digits at 16 px for one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from supcon_scale import checkpoint, distributed, export, resilience, weights
from supcon_scale.cli import main
from supcon_scale.console import MetricsLog

REPO = Path(__file__).resolve().parents[1]
TRAIN = [
    "train", "--config", "demo/digits", "data.backend=torchvision", "data.image_size=16",
    "data.global_batch_size=16", "data.workers=0", "train.max_steps=1", "train.progress=false", "train.log_every=1",
]  # fmt: skip
TIMEOUT = 300  # seconds for any one subprocess
ODD = b"good\xff.jpg"  # a file name that is not UTF-8
BROKEN = b"broken\xfe.jpg"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPCON_", "TORCHELASTIC_", "SLURM_"))}
    for name in (*distributed.TORCHRUN_VARS, "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _clean_launcher_env(monkeypatch) -> None:
    for name in (*distributed.TORCHRUN_VARS, *distributed.SLURM_VARS, *distributed.AGENT_VARS, "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every entry under `root`: a link's target, or a file's sha256 (the state to compare before and after)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = os.fsencode(path.relative_to(root)).decode("utf-8", "backslashreplace")
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            out[rel] = ("dir", "")
    return out


def one_line_error(err: str, *names: str) -> str:
    """The error line naming every one of `names`; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error" in line and all(n in line for n in names)]
    assert lines, f"no one-line error naming {names} in:\n{err[-3000:]}"
    return lines[0]


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TRAIN, f"data.root={data}", f"out_dir={out}", *extra]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the digits at 16 px (with a file name that is not UTF-8), the same with a broken file, one trained run


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    from supcon_scale.data.folder import make_demo_data

    root = make_demo_data(tmp_path_factory.mktemp("data16"), size=16)
    for split, keep in (("train", 8), ("val", 4)):
        for folder in (root / split).iterdir():
            for extra in sorted(folder.iterdir())[keep:]:
                extra.unlink()
        first = sorted((root / split / "0").iterdir())[0]
        shutil.copyfile(first, os.path.join(os.fsencode(root / split / "0"), ODD))
    return root


@pytest.fixture(scope="module")
def hostile_data(data16: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "data"
    shutil.copytree(data16, root)
    Path(os.fsdecode(os.path.join(os.fsencode(root / "train" / "1"), BROKEN))).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def run16(data16: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run16") / "run"
    assert main(train_args(data16, out)) == 0
    return out


@pytest.fixture(scope="module")
def step_dir(run16: Path) -> Path:
    return checkpoint.latest(run16)


def _checkpoint_copy(step_dir: Path, where: Path, **meta_changes) -> Path:
    """A copy of a complete checkpoint with meta.json fields replaced (None: the key removed)."""
    dst = where / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta.update(meta_changes)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def _encoder_file(src: Path, dst: Path, *, name: str | None = None, change=None) -> Path:
    """A copy of an exported encoder, with another `encoder` name in its metadata or a tensor changed."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(src))
    if name is not None:
        meta["encoder"] = name
    if change is not None:
        change(state)
    save_file(state, str(dst), metadata=meta)
    return dst


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (a hub name must be refused before timm asks the hub)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------------
# Config (the schema's checks: tests/test_config*.py hold the unit tests; here the CLI's answer)


def _alias_bomb(levels: int = 9) -> str:
    lines = ["- &a0 [l, l, l, l, l, l, l, l, l, l]"]
    lines += [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "out_dir:\n" + "\n".join(lines) + "\n"


def _deep_chain(tmp: Path, depth: int = 1500) -> Path:
    for i in range(depth):
        (tmp / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n" if i + 1 < depth else "seed: 1\n")
    return tmp / "c0.yaml"


CONFIG_ROWS = [
    ("optim.base_lr=inf", "optim.base_lr"),
    ("loss.temperature=inf", "loss.temperature"),
    ("optim.weight_decay=.nan", "optim.weight_decay"),
    ("optim.momentum=.nan", "optim.momentum"),
    ("train.warmup_epochs=.nan", "train.warmup_epochs"),
    ("train.log_every=0", "train.log_every"),
    ("data.global_batch_size=[1", "data.global_batch_size"),
]


@pytest.mark.parametrize(("override", "named"), CONFIG_ROWS)
def test_config_value_refused_before_anything_is_written(override, named, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, [*TRAIN, f"out_dir={out}", override])
    assert rc == 2
    one_line_error(err, named)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["alias_bomb", "base_5", "base_list", "deep_chain"])
def test_config_file_refused(kind, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    if kind == "alias_bomb":
        path.write_text(_alias_bomb())
        named = "alias"
    elif kind == "base_5":
        path.write_text("base: 5\n")
        named = "base"
    elif kind == "base_list":
        path.write_text("base: [a.yaml, b.yaml]\n")
        named = "base"
    else:
        path = _deep_chain(tmp_path)
        named = "base"
    rc, err = run_cli(capsys, ["train", "--config", path, f"out_dir={tmp_path / 'out'}"])
    assert rc == 2
    one_line_error(err, named)
    assert not (tmp_path / "out").exists()


def test_hash_inside_an_override_value_is_kept(capsys):
    rc, out = run_cli(capsys, ["config", "show", "--json", "out_dir=runs/exp #3"])
    assert rc == 0
    rows = {r["key"]: r["value"] for r in json.loads(out[out.index("[") :])}
    assert rows["out_dir"] == "runs/exp #3"


# ---------------------------------------------------------------------------------------------------------------
# Writes into out_dir never follow a link; a refused run writes nothing; SUPCON_FAULTS is not obeyed


def test_hostile_run_replaces_planted_links_ignores_faults_and_lists_odd_names(hostile_data, tmp_path):
    """One production run (`python -m supcon_scale.cli train`) over a folder with a file name that is not UTF-8 and
    a broken image, with SUPCON_FAULTS and a stray TORCHELASTIC_RUN_ID set, into an out_dir full of planted links:
    it trains, skips and lists the broken file, and every link's target is untouched."""
    outside = tmp_path / "outside"
    (outside / "victim_dir").mkdir(parents=True)
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    planted = [
        "config.yaml", ".tmp-config.yaml", "encoder.safetensors", ".tmp-encoder.safetensors", "bad_files.txt",
        ".tmp-bad_files.txt",
    ]  # fmt: skip
    for i, name in enumerate(planted):
        victim = outside / f"victim_{i}"
        victim.write_text(f"precious {i}\n")
        (out / name).symlink_to(victim)
    (out / "checkpoints" / ".tmp-step_00000001").symlink_to(outside / "victim_dir", target_is_directory=True)
    (outside / "victim_dir" / "keep.txt").write_text("keep\n")
    before = snapshot(outside)

    proc = subprocess.run(
        [sys.executable, "-m", "supcon_scale.cli", *train_args(hostile_data, out)],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        cwd=REPO,
        timeout=TIMEOUT,
        env=_env(SUPCON_FAULTS="kill_rank=0@1; nan_steps=1-1; die_in_save=1", TORCHELASTIC_RUN_ID="stray"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # kill_rank / die_in_save would exit 137
    assert "Traceback" not in proc.stderr
    assert snapshot(outside) == before  # no target written, nothing created beside them
    for name in ("config.yaml", "encoder.safetensors", "bad_files.txt"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert load_file(str(out / "encoder.safetensors"))  # a real export, loadable
    assert not (out / "checkpoints" / ".tmp-step_00000001").exists()
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert record and record[-1]["step"] == 1 and record[-1]["loss"] is not None  # nan_steps was not obeyed
    listed = (out / "bad_files.txt").read_text(encoding="utf-8")
    assert "broken\\xfe.jpg" in listed and listed.count("\n") == 1
    assert "bad_files.txt" in proc.stderr


def test_planted_metrics_link_is_refused_naming_it(data16, tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious\n")
    (out / "metrics.jsonl").symlink_to(victim)
    rc, err = run_cli(capsys, train_args(data16, out))
    assert rc == 2
    one_line_error(err, str(out / "metrics.jsonl"), "symbolic link")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # nothing else written


def test_metrics_log_and_replacing_writes_never_follow_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match="metrics.jsonl: a symbolic link"):
        MetricsLog(tmp_path / "metrics.jsonl").write({"step": 1})
    (tmp_path / "enc.safetensors").symlink_to(victim)
    (tmp_path / ".tmp-enc.safetensors").symlink_to(victim)
    export.export_encoder({"w": torch.ones(2)}, tmp_path / "enc.safetensors", export.encoder_metadata("resnet18"))
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "enc.safetensors").is_symlink()
    assert load_file(str(tmp_path / "enc.safetensors"))["w"].tolist() == [1.0, 1.0]


def test_refused_run_writes_nothing(run16, tmp_path, capsys, data16):
    out = tmp_path / "run"
    shutil.copytree(run16, out)
    before = snapshot(out)
    rc, err = run_cli(capsys, train_args(data16, out, "seed=7"))
    assert rc == 2
    one_line_error(err, "already holds checkpoints", "train.resume=auto")
    assert snapshot(out) == before  # config.yaml (and everything else) untouched


def test_out_dir_that_is_a_file(data16, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("mine\n")
    rc, err = run_cli(capsys, train_args(data16, out))
    assert rc == 2
    one_line_error(err, "out_dir", str(out), "not a directory")
    assert out.read_text() == "mine\n"


def test_out_dir_in_a_read_only_folder(data16, tmp_path):
    """As an unprivileged process: root writes anywhere, so as root the row runs without capabilities.

    Root without CAP_DAC_OVERRIDE obeys the permission bits like any user, yet stays uid 0, the owner of the
    checkout, the interpreter and tmp_path: the test does not depend on where they lie (a checkout under a private
    `mktemp -d` is out of `nobody`'s reach, and so is a venv inside it).
    """
    base = tmp_path / "hostile"
    (base / "ro").mkdir(parents=True)
    try:
        (base / "ro").chmod(0o555)
        cmd = [sys.executable, "-m", "supcon_scale.cli", *train_args(data16, base / "ro" / "out")]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *cmd]
        env = _env(HOME=str(base))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=env)
        assert proc.returncode == 2, proc.stderr[-3000:]
        one_line_error(proc.stderr, "out_dir", "not writable")
        assert list((base / "ro").iterdir()) == []
    finally:
        (base / "ro").chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and exported encoders: only local models, validated meta.json, finite weights, exact dtypes


@pytest.mark.parametrize("name", ["hf-hub:org/x", "local-dir:/tmp/somewhere", "timm/resnet18.a1_in1k"])
@pytest.mark.parametrize("command", ["knn", "linear-eval", "imagenet-c"])
def test_encoder_naming_a_remote_model_is_refused(command, name, run16, data16, tmp_path, capsys, no_network):
    enc = _encoder_file(run16 / "encoder.safetensors", tmp_path / "encoder.safetensors", name=name)
    if command == "imagenet-c":
        args = [command, "--c-root", tmp_path / "c", "--checkpoint", f"m={enc}", "--clean", data16]
    else:
        args = [command, "--checkpoint", enc, "--data", data16]
    rc, err = run_cli(capsys, args)
    assert rc == 2
    one_line_error(err, str(enc), name)


def test_kd_teacher_naming_a_hub_model_is_refused(data16, tmp_path, capsys, no_network):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, train_args(data16, out, "loss.name=genscl", "kd.teacher=hf-hub:org/x"))
    assert rc == 2
    one_line_error(err, "kd.teacher", "hf-hub:org/x")


class _Payload:
    """Unpickling this runs a command (touches a file): what an unsafe torch.load would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_kd_checkpoint_that_is_a_pickle_is_refused(data16, tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "teacher.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": _Payload(marker)}))
    extra = ("loss.name=genscl", "kd.teacher=resnet18", f"kd.checkpoint={evil}")
    rc, err = run_cli(capsys, train_args(data16, tmp_path / "out", *extra))
    assert rc == 2
    one_line_error(err, "kd.checkpoint", str(evil), "refused")
    assert not marker.exists()


def _header_bomb(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "huge_header"])
def test_damaged_safetensors_is_one_line_naming_the_file(damage, run16, data16, tmp_path, capsys):
    enc = tmp_path / "encoder.safetensors"
    good = (run16 / "encoder.safetensors").read_bytes()
    if damage == "garbage":
        enc.write_bytes(b"hello, not a tensor file")
    elif damage == "truncated":
        enc.write_bytes(good[: len(good) // 2])
    else:
        _header_bomb(enc)
    rc, err = run_cli(capsys, ["knn", "--checkpoint", enc, "--data", data16])
    assert rc == 2
    one_line_error(err, str(enc))


@pytest.mark.parametrize(("dtype", "shown"), [(torch.int64, "int64"), (torch.float16, "float16")])
def test_dtype_cast_weights_are_refused_naming_the_key(dtype, shown, run16, data16, tmp_path, capsys):
    def cast(state):
        state["conv1.weight"] = state["conv1.weight"].to(dtype)

    enc = _encoder_file(run16 / "encoder.safetensors", tmp_path / "encoder.safetensors", change=cast)
    rc, err = run_cli(capsys, ["knn", "--checkpoint", enc, "--data", data16])
    assert rc == 2
    one_line_error(err, "dtype mismatch", f"conv1.weight {shown} vs float32")


def test_nan_weights_in_an_encoder_are_refused_naming_the_tensor(run16, data16, tmp_path, capsys):
    def poison(state):
        state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")

    enc = _encoder_file(run16 / "encoder.safetensors", tmp_path / "encoder.safetensors", change=poison)
    rc, err = run_cli(capsys, ["linear-eval", "--checkpoint", enc, "--data", data16])
    assert rc == 2
    one_line_error(err, "layer1.0.conv1.weight", "NaN")


META_ROWS = [
    ({"step": -5}, "step=-5"),
    ({"step": 1e12}, "step=1000000000000.0"),
    ({"step": 10**12}, "step=1000000000000"),
    ({"epoch": -3}, "epoch=-3"),
    ({"world_size": 0}, "world_size=0"),
    ({"config": None}, "'config'"),
]


@pytest.mark.parametrize(("change", "named"), META_ROWS, ids=[n for _, n in META_ROWS])
def test_absurd_meta_json_is_refused_at_resume(change, named, step_dir, data16, tmp_path, capsys):
    ckpt = _checkpoint_copy(step_dir, tmp_path / "old", **change)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, train_args(data16, out, f"train.resume={ckpt}"))
    assert rc == 2
    one_line_error(err, str(ckpt / "meta.json"), named)
    assert not out.exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]"])
def test_meta_json_that_is_not_an_object_names_the_file(text, step_dir, data16, tmp_path, capsys):
    ckpt = _checkpoint_copy(step_dir, tmp_path / "old")
    (ckpt / "meta.json").write_text(text)
    rc, err = run_cli(capsys, train_args(data16, tmp_path / "out", f"train.resume={ckpt}"))
    assert rc == 2
    one_line_error(err, str(ckpt / "meta.json"))
    rc, err = run_cli(capsys, ["inspect", ckpt])
    assert rc == 2
    one_line_error(err, str(ckpt / "meta.json"))


def test_evaluation_reads_a_meta_json_list_as_no_config(step_dir, tmp_path):
    from supcon_scale.evaluation.linear import checkpoint_image_size, run_config

    ckpt = _checkpoint_copy(step_dir, tmp_path / "old")
    (ckpt / "meta.json").write_text("[1, 2, 3]")
    assert run_config(ckpt) is None and checkpoint_image_size(ckpt, cifar_stem=True) == 32


def test_nan_weights_are_refused_at_resume(step_dir, data16, tmp_path, capsys):
    ckpt = _checkpoint_copy(step_dir, tmp_path / "old")
    state = load_file(str(ckpt / "model.safetensors"))
    state["encoder.bn1.weight"][3] = float("inf")
    save_file(state, str(ckpt / "model.safetensors"))
    out = tmp_path / "out"
    rc, err = run_cli(capsys, train_args(data16, out, f"train.resume={ckpt}"))
    assert rc == 2
    one_line_error(err, "train.resume", "encoder.bn1.weight", "NaN or inf")
    assert not (out / "checkpoints").exists() and not (out / "encoder.safetensors").exists()


def test_nan_weights_are_never_saved_or_exported(tmp_path):
    state = {"encoder.w": torch.tensor([1.0, float("nan")]), "head.w": torch.ones(2)}
    cfg = {"model": {"encoder": "resnet18"}, "engine": {"name": "ddp"}, "loss": {}}
    with pytest.raises(resilience.NonFiniteError, match="model weight encoder.w holds NaN or inf"):
        checkpoint.save(tmp_path, 3, 0, {"model": state}, cfg, {})
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(resilience.NonFiniteError, match="encoder's w holds NaN or inf"):
        export.export_encoder(
            weights.encoder_state(state), tmp_path / "e.safetensors", export.encoder_metadata("resnet18")
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Data: empty classes, names that are not UTF-8, broken images during imagenet-c generation


def test_empty_class_folder_does_not_bypass_the_single_class_guard(data16, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data16 / "train" / "3", root / "train" / "3")
    (root / "train" / "4").mkdir()
    rc, err = run_cli(capsys, train_args(root, tmp_path / "out", "data.global_batch_size=8"))
    assert rc == 2
    one_line_error(err, "data.root", "single class")


def test_linear_eval_and_check_data_over_names_that_are_not_utf8(run16, data16, hostile_data, tmp_path, capsys):
    report = tmp_path / "eval.json"
    rc, out = run_cli(capsys, ["linear-eval", "--checkpoint", run16, "--data", data16, "--protocol", "fast",
                               "--json", report])  # fmt: skip
    assert rc == 0, out[-3000:]
    result = json.loads(report.read_text())
    assert result["num_train"] == 81 and result["num_val"] == 41  # the odd-named copies counted
    missing = tmp_path / "not" / "there" / "scan.json"
    rc, out = run_cli(capsys, ["check-data", hostile_data, "--no-manifest", "--workers", "1", "--json", missing])
    assert rc == 1  # one bad file found
    assert "broken\\xfe.jpg" in out and "Traceback" not in out
    assert len(json.loads(missing.read_text())["bad"]) == 1


def test_check_data_json_under_a_file_is_one_line(data16, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc, err = run_cli(capsys, ["check-data", data16 / "val", "--no-manifest", "--json", tmp_path / "file" / "r.json"])
    assert rc == 2
    one_line_error(err, str(tmp_path / "file"))


def test_imagenet_c_generation_skips_and_lists_a_broken_image(hostile_data, tmp_path, capsys):
    c_root = tmp_path / "c"
    args = ["imagenet-c", "--generate-from", hostile_data / "train", "--c-root", c_root,
            "--corruptions", "gaussian_noise", "--severities", "1", "--workers", "1"]  # fmt: skip
    rc, out = run_cli(capsys, args)
    assert rc == 0, out[-3000:]
    assert "skipped 1 undecodable" in out
    written = list((c_root / "gaussian_noise" / "1").rglob("*.jpg"))
    assert len(written) == 81  # 80 digits and the odd-named copy; the broken one skipped
    assert "broken\\xfe.jpg" in (c_root / "bad_files.txt").read_text()


def test_make_demo_data_onto_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine\n")
    rc, err = run_cli(capsys, ["make-demo-data", target])
    assert rc == 2
    one_line_error(err, str(target), "not a directory")
    assert target.read_text() == "mine\n"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation flags


FLAG_ROWS = [
    (["linear-eval", "--lr", "nan"], "--lr"),
    (["linear-eval", "--image-size", "-1"], "--image-size"),
    (["knn", "--temperature", "nan"], "--temperature"),
    (["knn", "--k", "0"], "--k"),
    (["knn", "--device", "quantum"], "--device"),
    (["linear-eval", "--device", "quantum"], "--device"),
    (["imagenet-c", "--image-size", "-1", "--c-root", "x"], "--image-size"),
]


@pytest.mark.parametrize(("args", "flag"), FLAG_ROWS, ids=[" ".join(a) for a, _ in FLAG_ROWS])
def test_evaluation_flags_are_checked(args, flag, run16, data16, capsys):
    extra = [] if args[0] == "imagenet-c" else ["--checkpoint", run16, "--data", data16]
    rc, err = run_cli(capsys, [*args, *extra])
    assert rc == 2
    one_line_error(err, flag)


# ---------------------------------------------------------------------------------------------------------------
# Launcher variables: read in one place, validated together, a bounded rendezvous


ENV_ROWS = [
    ({"RANK": "1"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "abc", "RANK": "0"}, "WORLD_SIZE='abc'"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2"),
    ({"SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two'"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
    ({"LOCAL_WORLD_SIZE": "many"}, "LOCAL_WORLD_SIZE='many'"),
]


@pytest.mark.parametrize(("env", "named"), ENV_ROWS, ids=[n for _, n in ENV_ROWS])
def test_launcher_environment_is_validated_together(env, named, data16, tmp_path, capsys, monkeypatch):
    _clean_launcher_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rc, err = run_cli(capsys, train_args(data16, out))
    assert rc == 2
    one_line_error(err, named)
    assert not out.exists()  # RANK=1 alone no longer exits 0 with nothing written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("source", ["WORLD_SIZE", "SLURM_NTASKS"])
def test_a_missing_peer_times_out_naming_the_address_and_variable(source, monkeypatch):
    _clean_launcher_env(monkeypatch)
    port = _free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if source == "WORLD_SIZE":
        env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    else:
        env.update(SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as info:
        distributed.init("gloo", device="cpu", rendezvous_timeout_s=2.0)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and f"{source}=2" in message and "1 rank(s) arrived" in message
    assert not torch.distributed.is_initialized()


def test_launcher_variables_are_read_only_in_distributed():
    """No other module of the run reads RANK, WORLD_SIZE, MASTER_*, SLURM_* or TORCHELASTIC_* itself (doctor.py only
    reports them; bench/ tools are outside a run)."""
    names = (*distributed.TORCHRUN_VARS, *distributed.SLURM_VARS, *distributed.AGENT_VARS, "TORCHELASTIC_", "LOCAL_")
    package = REPO / "supcon_scale"
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel in ("distributed.py", "doctor.py") or rel.startswith("bench/"):
            continue
        text = path.read_text()
        for name in names:
            assert f'environ.get("{name}' not in text and f'environ["{name}' not in text, (rel, name)


def test_stray_torchelastic_variables_never_signal_a_plain_parent():
    """Every agent variable set, but the parent is the user's shell: a preempted run must not SIGTERM it."""
    code = "from supcon_scale import resilience; resilience.notify_agent(); print('child-done')"
    script = f'{sys.executable} -c "{code}"; echo parent-alive'
    env = _env(TORCHELASTIC_RUN_ID="x", TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0",
               GROUP_RANK="0", LOCAL_RANK="0")  # fmt: skip
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0 and "child-done" in proc.stdout and "parent-alive" in proc.stdout, proc.stderr


def test_a_torchrun_parent_is_recognised_by_its_command_line():
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "torchrun"])
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while b"torchrun" not in Path(f"/proc/{fake.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resilience.parent_is_torchrun(fake.pid)
        assert not resilience.parent_is_torchrun(plain.pid)
        assert not resilience.parent_is_torchrun(os.getpid())  # pytest
    finally:
        for p in (fake, plain):
            p.send_signal(signal.SIGKILL)
            p.wait()
