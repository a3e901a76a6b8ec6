"""The labelled key queue (`loss.queue_size`): FIFO semantics against a deque, applied steps only, the objective's
loss against the float64 brute force of tests/test_losses_queue.py, 2 gloo ranks against 1 process, exact resume."""

from __future__ import annotations

import io
from collections import deque
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks
from test_losses_queue import queued_brute_force

from supcon_scale import checkpoint, config, distributed, objectives, trainer
from supcon_scale.bench.gpu_check import queue_steps
from supcon_scale.distributed import Context
from supcon_scale.hooks import StepInfo
from supcon_scale.models import Output
from supcon_scale.objectives.queue import KeyQueue

REPO = Path(__file__).resolve().parents[1]
CTX = Context(rank=0, world_size=1, local_rank=0)


def _info(step: int, stepped: bool = True) -> StepInfo:
    return StepInfo(step, 0, torch.tensor(0.0), stepped, 0, False, False)


def test_fifo_wraps_and_keeps_labels_with_their_keys():
    """Against a deque of (sample keys, label) of maxlen slots, read back in slot order."""
    q = KeyQueue(size=10, dim=3, views=2)  # 5 sample slots
    ref: deque = deque(maxlen=5)
    slots: list = [None] * 5
    ptr = 0
    g = torch.Generator().manual_seed(0)
    for n in (2, 2, 3, 1, 7, 0, 4):  # wraps, a batch larger than the queue, an empty batch
        keys = torch.nn.functional.normalize(torch.randn(n * 2, 3, generator=g), dim=1)
        labels = torch.randint(0, 9, (n,), generator=g)
        q.stage(keys, labels)
        q.on_step(_info(1))
        for s in range(n):
            ref.append((keys[2 * s : 2 * s + 2], int(labels[s])))
            slots[ptr] = ref[-1]
            ptr = (ptr + 1) % 5
        got_keys, got_labels = q.contents()
        assert q.filled == len(ref) and got_labels.shape == (len(ref),)
        assert q.ptr == ptr
        for slot in range(q.filled):
            torch.testing.assert_close(got_keys[2 * slot : 2 * slot + 2], slots[slot][0])  # re-normalised
            assert int(got_labels[slot]) == slots[slot][1]
        assert sorted(int(y) for y in got_labels) == sorted(y for _, y in ref)  # the newest 5, nothing else


def test_skipped_step_leaves_no_trace():
    q = KeyQueue(size=4, dim=2, views=2)
    q.stage(torch.ones(2, 2), torch.tensor([3]))
    q.on_step(_info(1, stepped=False))
    assert q.filled == 0 and q.ptr == 0 and not q.keys.any()
    q.on_step(_info(2))  # the skipped step's staged keys are gone: nothing to commit
    assert q.filled == 0
    q.stage(torch.ones(2, 2), torch.tensor([3]))
    q.on_step(_info(3))
    assert q.filled == 1 and q.labels[0] == 3


def test_state_dict_loads_weights_only_and_refuses_another_shape():
    q = KeyQueue(size=6, dim=2, views=2)
    q.stage(torch.randn(4, 2), torch.tensor([1, 2]))
    q.on_step(_info(1))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    r = KeyQueue(size=6, dim=2, views=2)
    r.load_state_dict(state)
    assert torch.equal(r.keys, q.keys) and torch.equal(r.labels, q.labels) and (r.ptr, r.filled) == (2, 2)
    with pytest.raises(ValueError, match="loss.queue_size"):
        KeyQueue(size=8, dim=2, views=2).load_state_dict(state)


def _objective(*extra: str) -> objectives.Objective:
    cfg = config.load(None, ["loss.temperature=0.3", "model.feat_dim=4", "loss.queue_size=8", *extra])
    return objectives.build(cfg, 4, CTX)


@pytest.mark.parametrize("name", ["supcon", "simclr"])
@pytest.mark.parametrize("momentum_keys", [False, True])
def test_objective_contrasts_the_previous_steps_keys(name: str, momentum_keys: bool):
    """Step 2's loss is the brute force over the batch + step 1's keys (Output.keys if given, else z detached)."""
    objective = _objective(f"loss.name={name}")
    (queue,) = objective.hooks()
    g = torch.Generator().manual_seed(1)
    z1, k1 = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    y1, y2 = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 0])
    first = objective(Output(z=z1, keys=k1) if momentum_keys else z1, y1)
    plain = queued_brute_force(z1, y1, torch.zeros(0, 4), None, 0.3, use_labels=name == "supcon")
    assert torch.allclose(first, plain.float())  # an empty queue: the plain loss
    objective.hooks()[0].on_step(_info(1))
    z2 = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    keys = torch.nn.functional.normalize((k1 if momentum_keys else z1).double().reshape(6, 4), dim=1)
    got = objective(Output(z=z2, keys=k1) if momentum_keys else z2, y2)
    want = queued_brute_force(z2, y2, keys, y1, 0.3, use_labels=name == "supcon")
    (g_got,) = torch.autograd.grad(got, z2)
    (g_want,) = torch.autograd.grad(want, z2)
    assert queue.filled == 3 and torch.allclose(got, want, rtol=1e-6) and torch.allclose(g_got, g_want, rtol=1e-5)


def test_queue_config_mistakes_are_one_line_errors():
    base = ["model.feat_dim=128", "data.views=2"]
    for extra, key in (
        (["loss.queue_size=5"], "data.views"),
        (["loss.queue_size=4194304"], "1 GiB"),
        (["loss.queue_size=4", "loss.name=genscl"], "loss.name=genscl"),
        (["loss.queue_size=4", "loss.name=cross_entropy"], "loss.name=cross_entropy"),
    ):
        with pytest.raises(config.ConfigError, match="loss.queue_size") as err:
            config.check_run(config.load(None, [*base, *extra]))
        assert key in str(err.value) and "\n" not in str(err.value)


def test_continual_objectives_have_no_hooks():
    """The continual learner builds its own hook list; its objectives add none (Objective.hooks() is [])."""
    from supcon_scale.continual.er import ERObjective
    from supcon_scale.continual.scr import SCRObjective

    assert SCRObjective.hooks is ERObjective.hooks is objectives.Objective.hooks


def test_gpu_check_queue_step_on_cpu():
    """The GPU check's queue step (make gpu-check) on the CPU: keys enter, the loss stays finite."""
    result = queue_steps(torch.device("cpu"), steps=3, batch=8, queue=16, dim=8)
    assert result["filled"] == 8 and result["finite"]


# --- 2 gloo ranks against 1 process over several steps --------------------------------------------------------


def _train_queue(rank: int, world: int, steps: int = 4) -> dict:
    """A linear encoder on a fixed global batch per step; each rank takes its slice, gradients averaged (DDP)."""
    cfg = config.load(None, ["loss.temperature=0.3", "model.feat_dim=4", "loss.queue_size=12", "loss.impl=tiled"])
    objective = objectives.build(cfg, 4, CTX)
    (queue,) = objective.hooks()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(3)
    losses = []
    for step in range(1, steps + 1):
        x, y = torch.randn(4, 2, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
        part = slice(rank * 4 // world, (rank + 1) * 4 // world)
        loss = objective(model(x[part]), y[part])
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.grad = distributed.all_reduce_mean(p.grad)
        opt.step()
        losses.append(distributed.all_reduce_mean(loss.detach()).item())
        queue.on_step(_info(step))
    # plain lists across the process boundary (a shared-memory tensor dies with its worker)
    state = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in queue.state_dict().items()}
    return {"losses": losses, "weight": model.weight.detach().tolist(), "state": state}


def test_two_ranks_equal_one_process_with_a_queue():
    one = _train_queue(0, 1)
    two = run_ranks(_train_queue, 2)
    assert two[0]["state"]["filled"] == 6 and two[0]["state"]["ptr"] == 4  # 16 samples into 6 slots
    for r in two:
        assert r["state"]["labels"] == one["state"]["labels"]
        keys, want = torch.tensor(r["state"]["keys"]), torch.tensor(one["state"]["keys"])
        torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-6)  # float32 keys of float64 embeddings
        torch.testing.assert_close(torch.tensor(r["weight"]), torch.tensor(one["weight"]), rtol=1e-9, atol=1e-12)
        assert r["losses"] == pytest.approx(one["losses"], rel=1e-9)
    assert two[0]["state"]["keys"] == two[1]["state"]["keys"]  # the same queue on every rank


# --- resume ---------------------------------------------------------------------------------------------------


def _cfg(digits: Path, out: Path, *extra: str) -> config.RunConfig:
    return config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [
            f"data.root={digits}",
            f"out_dir={out}",
            "data.backend=torchvision",
            "data.workers=0",
            "data.global_batch_size=16",
            "model.encoder=test_resnet",
            "data.image_size=16",
            "model.feat_dim=16",
            "model.sync_bn=false",
            "loss.queue_size=48",  # 24 samples: the queue wraps in the 4 steps of 16
            "train.epochs=1",
            "train.warmup_epochs=0",
            "train.max_steps=4",
            "train.progress=false",
            "train.resume=auto",
            *extra,
        ],
    )


@pytest.mark.parametrize("siblings", [(), ("model.momentum=0.9", "train.ema_decay=0.8")], ids=["queue", "momentum_ema"])
def test_resume_with_a_queue_is_exact(small_digits: Path, tmp_path: Path, siblings: tuple[str, ...]):
    """Crashed after step 3 and resumed from step 2: the weights (the momentum encoder's and the EMA's too) and the
    queue at step 4 equal the uninterrupted run's."""
    from test_trainer import Crash, CrashAt

    trainer.fit(_cfg(small_digits, tmp_path / "a", *siblings), distributed.init(seed=0))
    crashing = _cfg(small_digits, tmp_path / "b", "train.checkpoint_every_steps=2", *siblings)
    with pytest.raises(Crash):
        trainer.fit(crashing, distributed.init(seed=0), hooks=[CrashAt(3)])
    trainer.fit(_cfg(small_digits, tmp_path / "b", *siblings), distributed.init(seed=0))
    a, b = (checkpoint.load(checkpoint.latest(tmp_path / x)) for x in ("a", "b"))
    assert a[0]["step"] == b[0]["step"] == 4
    qa, qb = a[2]["data"]["key_queue"], b[2]["data"]["key_queue"]
    assert (qa["filled"], qa["ptr"]) == (qb["filled"], qb["ptr"]) == (24, 64 % 24)
    assert torch.equal(qa["keys"], qb["keys"]) and torch.equal(qa["labels"], qb["labels"])
    assert any(k.startswith("momentum.") for k in a[1]["model"]) == bool(siblings)
    for k, v in a[1]["model"].items():
        assert torch.equal(v, b[1]["model"][k]), k


# --- elastic resume (slow tier): 2 -> 3 -> 1 ranks with a queue ----------------------------------------------


def _elastic_queue(root: Path, out: Path, plan: list[tuple[int, str | None]]) -> Path:
    from test_elastic import _fit, _overrides

    for world, stop in plan:
        overrides = _overrides(root, out, "ddp", "loss.queue_size=16", "model.momentum=0.9", *([stop] if stop else []))
        run_ranks(_fit, world, overrides, timeout=600)
    return checkpoint.latest(out)


@pytest.mark.slow
def test_elastic_resume_two_three_one_keeps_the_queue(tmp_path: Path):
    """With the momentum encoder feeding it, a 2-rank run resumed on 3 ranks, then on 1, ends with the
    uninterrupted 1-process run's queue: the same labels (of the same samples), pointer and fill count exactly;
    every rank's file of every checkpoint holds the same queue. The keys are not compared: the weights themselves
    drift apart across world sizes (per-rank batch norm, another summation order), as in tests/test_elastic.py,
    which compares the samples only."""
    from data_images import write_coded

    root = write_coded(tmp_path / "data", 4, 9)
    want = _elastic_queue(root, tmp_path / "one", [(1, None)])
    got = _elastic_queue(root, tmp_path / "elastic", [(2, "train.max_steps=2"), (3, "train.max_steps=8"), (1, None)])
    queues = [torch.load(p / "rank_0.pt", weights_only=True)["data"]["key_queue"] for p in (want, got)]
    assert (queues[0]["ptr"], queues[0]["filled"]) == (queues[1]["ptr"], queues[1]["filled"]) == (12 * 6 % 8, 8)
    assert torch.equal(queues[0]["labels"], queues[1]["labels"])
    norms = queues[1]["keys"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    ranks = sorted((tmp_path / "elastic").glob("**/rank_*.pt"))
    assert ranks  # the kept checkpoints' rank files
    by_dir: dict[Path, list] = {}
    for path in ranks:
        by_dir.setdefault(path.parent, []).append(torch.load(path, weights_only=True)["data"]["key_queue"])
    for states in by_dir.values():
        assert all(torch.equal(s["keys"], states[0]["keys"]) for s in states)
