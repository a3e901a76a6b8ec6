"""The real launch path: two torchrun "nodes" on 127.0.0.1 via launch/torchrun_multinode.sh, training the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiproc import free_port
from supcon_scale import checkpoint
from supcon_scale.data.folder import make_demo_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_demo_data(root)
    return root


def two_nodes(out: Path, data: Path, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Launch node 0 and node 1 (one process each) of one c10d rendezvous, like two machines would."""
    port = str(free_port())
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NPROC_PER_NODE": "1",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RDZV_ID": port}
    args = ["bash", str(ROOT / "launch" / "torchrun_multinode.sh"), "configs/demo/digits.yaml", f"out_dir={out}",
            f"data.root={data}", "data.global_batch_size=16", "data.image_size=16", "train.max_steps=3",
            "train.progress=false", "model.feat_dim=16", *overrides]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**env, "NODE_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    results = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        results.append(subprocess.CompletedProcess(args, p.returncode, stdout))
    return results


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_node_torchrun_trains_and_checkpoints(engine, demo_data, tmp_path):
    """DeepSpeed runs under torchrun here: the `deepspeed` launcher reaches every host by ssh (pdsh) and, with
    `--num_gpus` on a machine without GPUs, finds no devices to launch on; the engine itself only needs the
    RANK/WORLD_SIZE environment, which both launchers set (launch/deepspeed.sh is the cluster path)."""
    out = tmp_path / engine
    results = two_nodes(out, demo_data, f"engine.name={engine}", "engine.zero_stage=0")
    for r, res in enumerate(results):
        assert res.returncode == 0, f"node {r}:\n{res.stdout[-4000:]}"
    newest = checkpoint.latest(out)
    assert newest is not None and checkpoint.is_complete(newest)
    meta, state, _ = checkpoint.load(newest)
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert meta["engine"] == engine
    assert "encoder.conv1.weight" in state["model"]


RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/supcon_resnet*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_loads_and_trains_one_step_tiny(recipe):
    """Each recipe's paper values survive loading; with a tiny override it builds and takes one finite step."""
    import torch

    from supcon_scale import config, engines, losses, models, optim
    from supcon_scale.distributed import Context

    full = config.load(ROOT / recipe)
    assert full.loss.scale == "temperature" and full.loss.temperature == 0.1 and full.loss.variant == "out"
    assert full.model.sync_bn and full.precision == "bf16"
    peak = optim.scaled_lr(full.optim, full.data.global_batch_size)
    expected = {"resnet50": 9.6, "resnet101": 6.4, "resnet200": 3.2}
    assert peak == pytest.approx(8.0 if "cifar" in recipe else expected[full.model.encoder])
    # torch's SyncBatchNorm refuses CPU tensors: the tiny run uses plain batch norm
    cfg = config.load(ROOT / recipe, ["model.encoder=resnet18", "model.sync_bn=false", "data.global_batch_size=4",
                                      "data.image_size=32", "precision=bf16"])
    torch.manual_seed(0)
    engine = engines.build(cfg, Context(), models.build(cfg.model), total_steps=10, warmup_steps=2)
    engine.train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(cfg.data.views)]
    with engine.autocast():
        out = engine(torch.cat(views))
    feats = out.float().reshape(cfg.data.views, 4, -1).transpose(0, 1)
    loss = losses.build(cfg.loss)(feats, torch.tensor([0, 1, 0, 1]))
    engine.backward(loss)
    assert engine.step() and torch.isfinite(loss)


def test_bench_train_smoke(tmp_path):
    import json

    from supcon_scale.engines.bench import main

    out = tmp_path / "bench.json"
    assert main(["--model", "resnet18", "--batch-per-gpu", "2", "--image-size", "32", "--steps", "1", "--warmup", "0",
                 "--precision", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ce, supcon = report["results"]
    assert (ce["loss"], supcon["loss"]) == ("cross_entropy", "supcon")
    assert supcon["views_per_s"] == pytest.approx(2 * supcon["images_per_s"])
    assert main(["--batch-per-gpu", "1"]) == 2
