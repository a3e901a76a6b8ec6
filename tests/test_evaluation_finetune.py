"""`supcon-scale finetune`: the whole encoder trains with a new head (standard and CIFAR stem)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from supcon_scale.export import encoder_from_export, encoder_metadata, export_encoder
from supcon_scale.models import create_encoder


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    for split, n in (("train", 12), ("val", 6)):
        for c in ("0", "1", "7"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((digits / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return root


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_finetune_trains_every_encoder_weight_and_reports_the_final_epoch(small, tmp_path, cifar_stem):
    from supcon_scale.cli import main

    torch.manual_seed(0)
    encoder = create_encoder("resnet18", cifar_stem=cifar_stem)
    path = export_encoder(
        encoder, tmp_path / "encoder.safetensors", encoder_metadata("resnet18", cifar_stem=cifar_stem)
    )
    out, saved = tmp_path / "r.json", tmp_path / "tuned.safetensors"
    argv = ["finetune", "--checkpoint", str(path), "--data", str(small), "--epochs", "2", "--batch-size", "12",
            "--lr", "0.05", "--image-size", "32", "--json", str(out), "--save", str(saved)]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "finetune" and r["epochs"] == 2 and r["num_val"] == 18 and 0 <= r["top1"] <= 1
    lo, hi = r["interval_95"]
    assert lo <= r["top1"] <= hi
    tuned, meta = encoder_from_export(saved)
    assert meta["cifar_stem"] == str(int(cifar_stem))
    before, after = encoder.state_dict(), tuned.state_dict()
    weights = [k for k, v in before.items() if v.is_floating_point() and "running" not in k]
    assert all(not torch.equal(before[k], after[k]) for k in weights if k.endswith("conv1.weight"))
    changed = sum(not torch.equal(before[k], after[k]) for k in weights)
    assert changed == len(weights)  # nothing is frozen: every encoder tensor moved
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)  # BN statistics update


def test_finetune_bad_input_is_exit_2(small, tmp_path, capsys):
    from supcon_scale.cli import main

    path = export_encoder(create_encoder("resnet18"), tmp_path / "e.safetensors", encoder_metadata("resnet18"))
    assert main(["finetune", "--checkpoint", str(path), "--data", str(small), "--epochs", "0"]) == 2
    assert "finetune: error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning is a training run: trainer.fit from model.init_from with the classifier objective


def _export(tmp_path: Path, cifar_stem: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", cifar_stem=cifar_stem)
    meta = encoder_metadata("resnet18", cifar_stem=cifar_stem)
    return encoder, export_encoder(encoder, tmp_path / "encoder.safetensors", meta)


def test_one_step_is_nesterov_sgd_on_the_cross_entropy_of_the_export_and_a_new_head(small, tmp_path):
    """One step over the whole train split (36 images, crop of the whole image, no flip) against a step written
    here: cross-entropy of a linear head on the export's features, Nesterov momentum at the absolute --lr, weight
    decay on the weights only (timm's rule), batch norm in train mode."""
    import copy

    import torch.nn.functional as F
    from safetensors.torch import load_file

    from supcon_scale import distributed, models
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.evaluation.finetune import finetune_config, run

    encoder, path = _export(tmp_path)
    over = ["data.augment.crop_scale=[1.0, 1.0]", "data.augment.flip_p=0.0", "model.channels_last=false"]
    cfg = finetune_config(path, small, tmp_path / "run", image_size=32, epochs=1, batch_size=36, lr=0.05,
                          weight_decay=1e-3, device="cpu", overrides=over)  # fmt: skip
    assert cfg.model.init_from == str(path.absolute()) and cfg.loss.name == "cross_entropy"
    _, result = run(cfg, distributed.init(seed=0, device="cpu"))
    assert result["steps"] == 1 and result["num_val"] == 18 and result["lr"] == 0.05

    torch.manual_seed(cfg.seed)  # the head's initial weights: the trainer seeds, then builds encoder and head
    model = models.build(copy.deepcopy(cfg.model), 3, 32)
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in encoder.state_dict().items())
    images = EvalDataset(small, "train", 32, crop="identity")  # scale 1, no flip, no colour: the image itself
    x = torch.stack([images[i][0] for i in range(len(images))])
    y = torch.tensor([images[i][1] for i in range(len(images))])
    model.train()
    F.cross_entropy(model(x), y).backward()
    got = load_file(str(tmp_path / "run/checkpoints/step_00000001/model.safetensors"))
    for name, p in model.named_parameters():
        g = p.grad + (1e-3 * p.detach() if p.ndim > 1 else 0)  # L2 on weights; none on biases and norms
        step = -0.05 * (g + 0.9 * g)  # Nesterov from zero momentum: the update is g + m * (m * 0 + g)
        # float32 sums over 36 x 32 x 32 positions in another order: 1e-4 of the step's size (seen: 6e-5)
        assert (got[name] - p.detach() - step).abs().max() <= 1e-3 * step.abs().max() + 1e-9, name


def test_init_from_takes_the_encoder_of_a_checkpoints_model_file(tmp_path):
    """`finetune --checkpoint CKPT_DIR` starts from the checkpoint's model.safetensors, whose encoder is stored under
    `encoder.` beside the projection head."""
    from safetensors.torch import save_file

    from supcon_scale import models

    encoder, _ = _export(tmp_path)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()} | {"head.weight": torch.zeros(4, 512)}
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = create_encoder("resnet18")
    models.load_init(fresh, str(tmp_path / "model.safetensors"))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in encoder.state_dict().items())


def _finetune_cli(rank: int, world: int, path: Path, data: Path, out: Path) -> dict:
    from supcon_scale.evaluation.finetune import main

    argv = ["--checkpoint", str(path), "--data", str(data), "--epochs", "1", "--batch-size", "12", "--lr", "0.05",
            "--image-size", "16", "--device", "cpu", "--out-dir", str(out), "--json", str(out / f"r{rank}.json"),
            "model.sync_bn=true"]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / f"r{rank}.json").read_text()) if rank == 0 else {}


@pytest.mark.slow  # two spawned ranks and a reference run: about 40 s on 2 cores
def test_finetune_on_two_ranks_equals_one_process(small, tmp_path):
    """DDP over gloo with global batch norm (`model.sync_bn=true`): each rank takes half of every batch of 12, and
    the weights after the 3 steps equal those of one process on the whole batch."""
    from multiproc import run_ranks
    from safetensors.torch import load_file

    _, path = _export(tmp_path)
    one = run_ranks(_finetune_cli, 1, path, small, tmp_path / "one")[0]
    two = run_ranks(_finetune_cli, 2, path, small, tmp_path / "two")[0]
    assert (one["world_size"], two["world_size"], one["steps"], two["steps"]) == (1, 2, 3, 3)
    a = load_file(str(tmp_path / "one/checkpoints/step_00000003/model.safetensors"))
    b = load_file(str(tmp_path / "two/checkpoints/step_00000003/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (tmp_path / "one/encoder.safetensors").is_file() and (tmp_path / "two/metrics.jsonl").is_file()


@pytest.mark.slow  # three short fine-tunes: about 30 s on 2 cores
def test_a_resumed_finetune_equals_an_uninterrupted_one(small, tmp_path):
    """A fine-tune that dies after step 5 of 6 resumes from its step-4 checkpoint (mid-epoch) and ends with the
    weights of the run that was never interrupted, to the bit."""
    from safetensors.torch import load_file

    from supcon_scale import distributed
    from supcon_scale.evaluation.finetune import finetune_config, run
    from supcon_scale.hooks import Hook, StepInfo

    class Crash(Exception):
        pass

    class CrashAfter(Hook):
        def on_step(self, info: StepInfo) -> None:
            if info.step == 5:
                raise Crash

    _, path = _export(tmp_path)
    ctx = distributed.init(seed=0, device="cpu")

    def cfg(out: str):
        return finetune_config(path, small, tmp_path / out, image_size=16, epochs=2, batch_size=12, lr=0.05,
                               device="cpu", overrides=["train.checkpoint_every_steps=2"])  # fmt: skip

    run(cfg("full"), ctx)
    with pytest.raises(Crash):
        run(cfg("resumed"), ctx, hooks=[CrashAfter()])
    assert sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir())[-1] == "step_00000004"
    distributed.seed_everything(99)  # the resume restores the RNG streams, whatever the process did before
    _, result = run(cfg("resumed"), ctx)
    assert result["steps"] == 6
    a = load_file(str(tmp_path / "full/checkpoints/step_00000006/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step_00000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
