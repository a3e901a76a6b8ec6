"""The commands around a run: `config show` (every schema key once, with its description), `inspect`, `--version`,
`plot` and `embed-plot` (non-empty PNGs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from supcon_scale import __version__, cli, config, distributed, trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(small_digits: Path, tmp_path_factory) -> Path:
    """Three steps of a run at 16 px with kNN rows, logged every step."""
    out = tmp_path_factory.mktemp("commands") / "run"
    cfg = config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [f"data.root={small_digits}", f"out_dir={out}", "data.global_batch_size=64", "data.image_size=16",
         "data.backend=torchvision", "data.workers=0", "train.epochs=1", "train.warmup_epochs=0",
         "train.log_every=1", "train.progress=false", "train.knn_every_epochs=1"],
    )  # fmt: skip
    trainer.fit(cfg, distributed.init(seed=0))
    return out


def test_config_show_lists_every_key_once_with_its_description(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["config", "show", "--config", "demo/digits", "seed=3", "log.plain=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = config.schema()
    assert len(lines) == len(keys)
    by_key = {}
    for line in lines:
        name = line.split()[0]
        assert name not in by_key, f"{name} listed twice"
        by_key[name] = line
    for k in keys:
        assert k.key in by_key, f"{k.key} missing from config show"
        assert by_key[k.key].endswith(f"  # {k.help}"), k.key
    assert by_key["seed"].split("  #")[0].split(None, 1)[1] == "3 (default 0)"
    assert by_key["log.plain"].split("  #")[0].split(None, 1)[1] == "true (default false)"
    assert by_key["model.encoder"].split("  #")[0].split(None, 1)[1] == '"resnet18" (default "resnet50")'
    assert by_key["precision"].split("  #")[0].split(None, 1)[1] == '"fp32" (default)'


def test_config_show_json_is_the_resolved_config(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["config", "show", "--json", "loss.temperature=0.2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == [k.key for k in config.schema()]
    values = {r["key"]: r for r in rows}
    assert values["loss.temperature"]["value"] == 0.2 and values["loss.temperature"]["default"] == 0.1
    assert values["loss.temperature"]["range"] == "> 0" and values["log.wandb_mode"]["value"] == "offline"


def test_config_show_refuses_a_bad_key_in_one_line(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["config", "show", "log.tensorbord=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean log.tensorboard?" in err[0]


def test_inspect_prints_the_checkpoint_without_unpickling(run: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["inspect", str(run)]) == 0  # a run directory: its newest checkpoint
    text = capsys.readouterr().out
    name, path = text.splitlines()[0].split(None, 1)
    assert name == "checkpoint" and path.endswith("checkpoints/step_00000003")
    meta = json.loads((run / "checkpoints/step_00000003/meta.json").read_text())
    assert f"step             {meta['step']}\n" in text and "epoch            0\n" in text
    assert "world size       1\n" in text and "engine           ddp\n" in text
    assert f"loss convention  {json.dumps(meta['loss_convention'])}\n" in text
    assert '  model.encoder = "resnet18"\n' in text and "  data.image_size = 16\n" in text
    assert cli.main(["inspect", "--json", str(run / "checkpoints/step_00000003")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert cli.main(["inspect", str(run / "tensorboard-nothing")]) == 2


def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "supcon_scale.cli", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == f"supcon-scale {__version__}"
    for command in (["config", "show"], ["inspect"]):
        proc = subprocess.run([sys.executable, "-m", "supcon_scale.cli", *command, "--help"], capture_output=True,
                              text=True, cwd=REPO, timeout=60)  # fmt: skip
        assert proc.returncode == 0 and "usage:" in proc.stdout, command


def _png(path: Path) -> tuple[int, int]:
    assert path.stat().st_size > 10_000, path  # a figure with content, not an empty canvas
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_plot_writes_the_curves(run: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["plot", str(run)]) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert written == [run / "plots/training_curves.png", run / "plots/time_shares.png"]
    for path in written:
        width, height = _png(path)
        assert width > 500 and height > 300


def test_plot_replaces_a_planted_link_never_writing_its_target(run: Path, tmp_path: Path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    png = run / "plots" / "training_curves.png"
    png.unlink(missing_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.symlink_to(target)
    assert cli.main(["plot", str(run)]) == 0
    assert target.read_text() == "keep me"
    assert not png.is_symlink() and _png(png)[0] > 500


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"supcon-scale: error: {tmp_path}: no metrics.jsonl (is it a training " \
        "run's out_dir?)"  # fmt: skip


def test_embed_plot_writes_the_map(run: Path, small_digits: Path, tmp_path: Path, capsys):
    out = tmp_path / "map.png"
    args = ["embed-plot", "--checkpoint", str(run / "encoder.safetensors"), "--data", str(small_digits),
            "--max-images", "150", "--method", "tsne", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    _png(out)
