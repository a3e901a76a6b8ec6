"""The real launch paths: two "nodes" on 127.0.0.1 under torchrun and under the deepspeed launcher (launch/*.sh)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiproc import free_port

from supcon_scale import checkpoint, recipes
from supcon_scale.data.folder import make_demo_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    make_demo_data(root)
    return root


DEMO = [
    "demo/digits",
    "data.global_batch_size=16",
    "data.image_size=16",
    "train.max_steps=3",
    "train.progress=false",
    "model.feat_dim=16",
]


def two_nodes(
    script: str, out: Path, data: Path, env: dict[str, str], *overrides: str
) -> list[subprocess.CompletedProcess]:
    """Run `launch/<script>` as node 0 and node 1 (one process each) of one job, like two machines would."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        **env,
    }
    args = ["bash", str(ROOT / "launch" / script), *DEMO, f"out_dir={out}", f"data.root={data}", *overrides]
    procs = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env={**env, "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    results = []
    deadline = time.monotonic() + 300  # one budget for both nodes, not 300 s each in turn
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        results.append(subprocess.CompletedProcess(args, p.returncode, stdout))
    return results


def assert_one_checkpoint(results: list[subprocess.CompletedProcess], out: Path, engine: str) -> None:
    for r, res in enumerate(results):
        assert res.returncode == 0, f"node {r}:\n{res.stdout[-4000:]}"
    newest = checkpoint.latest(out)
    assert newest is not None and checkpoint.is_complete(newest)
    meta, state, _ = checkpoint.load(newest)
    assert meta["world_size"] == 2 and meta["step"] == 3
    assert meta["engine"] == engine
    assert "encoder.conv1.weight" in state["model"]


def test_two_node_torchrun_trains_and_checkpoints(demo_data, tmp_path):
    """launch/torchrun_multinode.sh on both "nodes": one c10d rendezvous, ddp."""
    port = str(free_port())
    env = {"NNODES": "2", "MASTER_PORT": port, "NPROC_PER_NODE": "1", "RDZV_ID": port}
    results = two_nodes("torchrun_multinode.sh", tmp_path, demo_data, env, "engine.name=ddp")
    assert_one_checkpoint(results, tmp_path, "ddp")


def test_two_node_deepspeed_launcher_trains_and_checkpoints(demo_data, tmp_path):
    """The real `deepspeed` launcher (launch/deepspeed.sh) on both "nodes", in its no-ssh mode: each node runs it
    with its NODE_RANK, as pdsh would from node 0. ZeRO-1 (the default stage) with LARS."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes on one machine\nnode0 slots=1\nnode1 slots=1\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")  # the launcher that this environment installed
    env = {"HOSTFILE": str(hostfile), "NO_SSH": "1", "MASTER_PORT": str(free_port()), "DEEPSPEED": str(deepspeed)}
    out = tmp_path / "run"
    # the launcher sets CUDA_VISIBLE_DEVICES=<slot> even on a CPU machine; device=auto reads that as GPUs wanted
    results = two_nodes("deepspeed.sh", out, demo_data, env, "device=cpu")
    assert_one_checkpoint(results, out, "deepspeed")
    assert "--local_rank=0" in results[0].stdout  # the launcher's flag reached the CLI, which took it


RECIPES = [name for name in recipes.names() if re.fullmatch(r"\w+/supcon_resnet\d+", name)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_loads_and_trains_one_step_tiny(recipe):
    """Each recipe's paper values survive loading; with a tiny override it builds and takes one finite step."""
    import torch

    from supcon_scale import config, engines, models, optim
    from supcon_scale.distributed import Context
    from supcon_scale.objectives.supcon import contrastive_loss

    full = config.load(recipe)
    assert full.loss.scale == "temperature" and full.loss.temperature == 0.1 and full.loss.variant == "out"
    assert full.model.sync_bn and full.precision == "bf16"
    peak = optim.scaled_lr(full.optim, full.data.global_batch_size)
    expected = {"resnet50": 9.6, "resnet101": 6.4, "resnet200": 3.2}
    assert peak == pytest.approx(8.0 if "cifar" in recipe else expected[full.model.encoder])
    # torch's SyncBatchNorm refuses CPU tensors: the tiny run uses plain batch norm
    cfg = config.load(
        recipe,
        [
            "model.encoder=resnet18",
            "model.sync_bn=false",
            "data.global_batch_size=4",
            "data.image_size=32",
            "precision=bf16",
        ],
    )
    torch.manual_seed(0)
    engine = engines.build(
        engines.EngineSpec.from_run(cfg), Context(), models.build(cfg.model), total_steps=10, warmup_steps=2
    )
    engine.train()
    views = [torch.randn(4, 3, 32, 32) for _ in range(cfg.data.views)]
    with engine.autocast():
        out = engine(torch.cat(views))
    feats = out.float().reshape(cfg.data.views, 4, -1).transpose(0, 1)
    loss = contrastive_loss(cfg.loss)(feats, torch.tensor([0, 1, 0, 1]))
    engine.backward(loss)
    assert engine.step() and torch.isfinite(loss)


# ResNet-18, and the tiny ViT of the gpu-check smoke (ViT-Ti/16 at 32 px, 4 px patches, 2 blocks; no channels-last)
BENCH_MODELS = {
    "resnet18": ["--model", "resnet18"],
    "vit": ["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32, "patch_size": 4, "depth": 2}',
            "--no-channels-last"],
}  # fmt: skip


@pytest.mark.parametrize("model", list(BENCH_MODELS))
def test_bench_train_smoke(tmp_path, model):
    import json

    from supcon_scale.bench.train import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                *BENCH_MODELS[model],
                "--batch-per-gpu",
                "2",
                "--image-size",
                "32",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--precision",
                "fp32",
                "--lars",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["lars"]["lars_step_s"] > 0 and report["lars"]["zero_lars_step_s"] > 0
    import torch.distributed as dist

    assert not dist.is_initialized()  # the 1-rank group --lars needed is gone
    ce, supcon = report["results"]
    assert (ce["loss"], supcon["loss"]) == ("cross_entropy", "supcon")
    assert supcon["views_per_s"] == pytest.approx(2 * supcon["images_per_s"])
    assert main(["--batch-per-gpu", "1"]) == 2
    assert main(["--data", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as bad:  # argparse's one-line usage error
        main(["--model-kwargs", "[4]"])
    assert bad.value.code == 2


def test_bench_train_with_the_dali_loader(demo_data, tmp_path):
    """--data: the SupCon step fed by the real DALI CPU pipeline beside the synthetic one; --max-batch searches."""
    import json

    from supcon_scale.bench.train import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--model",
                "resnet18",
                "--batch-per-gpu",
                "4",
                "--image-size",
                "32",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--precision",
                "fp32",
                "--data",
                str(demo_data),
                "--backend",
                "dali-cpu",
                "--workers",
                "1",
                "--activation-checkpointing",
                "--max-batch",
                "6",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [(r["loss"], r["source"]) for r in report["results"]] == [
        ("cross_entropy", "synthetic"),
        ("supcon", "synthetic"),
        ("supcon", "loader"),
    ]
    assert report["loader"]["backend"] == "dali-cpu" and report["loader"]["vs_synthetic"] > 0
    assert report["activation_checkpointing"] and report["max_batch_per_gpu"] == 6  # the CPU has the memory


@pytest.mark.parametrize(
    "capacity,limit,want", [(37, 1000, 37), (5000, 100, 100), (1, 100, 1), (0, 100, 0), (64, 64, 64)]
)
def test_largest_batch_search(capacity, limit, want):
    from supcon_scale.bench.train import largest_batch

    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= capacity

    assert largest_batch(fits, 2, limit) == want
    assert max(tried) <= limit and len(tried) <= 2 * max(limit, 2).bit_length()


def test_step_fits_counts_out_of_memory_as_not_fitting(monkeypatch):
    import torch

    from supcon_scale import config
    from supcon_scale.bench import train as bench
    from supcon_scale.distributed import Context

    def measure(cfg, ctx, batch, steps, warmup, loss_name):
        assert cfg.data.global_batch_size == batch
        if batch > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")  # what the allocator raises on a GPU
        return {}

    monkeypatch.setattr(bench, "measure", measure)
    fits = bench.step_fits(config.load(None), Context())
    assert fits(8) and not fits(9)
    assert bench.largest_batch(fits, 2, 100) == 8


@pytest.mark.parametrize(
    "message, oom",
    [
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
        ("cuDNN error: CUDNN_STATUS_MAPPING_ERROR", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", True),
        ("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)", False),
    ],
)
def test_library_allocation_failures_count_as_out_of_memory(message, oom):
    """cuBLAS/cuDNN report a failed allocation as a RuntimeError, not torch.OutOfMemoryError: still "does not fit"."""
    from supcon_scale.bench.train import is_out_of_memory

    assert is_out_of_memory(RuntimeError(message)) is oom


@pytest.mark.slow  # 25 s; every benchmark it chains has its own fast test
def test_bench_gpu_script_smoke(tmp_path):
    """tools/bench_gpu.sh with SMOKE=1: every benchmark step it chains runs (tiny, on the CPU) and writes its JSON."""
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "bench_gpu.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == ["dataloader.json", "loss.json", "train_resnet18.json", "train_resnet18_ckpt.json"]
