"""Every config key has an effect (issue 28 item 1): the walk over `config.schema()`.

For each key the smallest thing it reaches (a loader batch, a model build and forward, engine steps, a loss call, a
schedule, a run component) runs at two valid values, the default and another, in a context where the key acts
(e.g. `loss.base_temperature` under `loss.scale=base_temperature`), and the observable must differ. A key whose
effect is not observable in one process on a CPU is listed in `ELSEWHERE` with the reason and where it is tested.
A key in neither table fails `test_every_key_is_walked`, so a new key forces a decision.
"""

from __future__ import annotations

import functools
import shutil
import signal
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from data_images import write_noise

from supcon_scale import averaging, config, engines, models, objectives, trainer
from supcon_scale.data import build_train_loader
from supcon_scale.distributed import Context
from supcon_scale.engines import EngineSpec
from supcon_scale.hooks import StepInfo
from supcon_scale.resilience import NonFiniteError, NonFiniteGuard, PreemptionHandler

CTX = Context(rank=0, world_size=1, local_rank=0)
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """The folders and files the probes read (built once for the module)."""
    base = tmp_path_factory.mktemp("effects")
    noise = write_noise(base / "noise", NUM_CLASSES, 5, seed=0)
    other = write_noise(base / "other", NUM_CLASSES, 6, seed=1)
    bad = write_noise(base / "bad", NUM_CLASSES, 5, seed=2)
    (bad / "train" / "c0" / "broken.png").write_bytes(b"not an image")
    weights = {}
    for i in (0, 1):  # two weight files of the kd teacher
        torch.manual_seed(i)
        weights[f"teacher{i}"] = str(base / f"teacher{i}.pt")
        torch.save(timm.create_model("test_resnet", num_classes=NUM_CLASSES).state_dict(), weights[f"teacher{i}"])
    shutil.copytree(noise / "train", noise / "val")  # the kNN monitor's split
    return {"noise": str(noise), "other": str(other), "bad": str(bad), **weights}


# --- the probes: each returns what a key's change must show (tensors, shapes, names, an error's text) ---------


def _quiet(fn: Callable[[config.RunConfig], Any]) -> Callable[[config.RunConfig], Any]:
    @functools.wraps(fn)
    def run(cfg: config.RunConfig) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return fn(cfg)
            except (ValueError, NonFiniteError) as exc:  # a refusal is an observable too (e.g. on_bad_file=fail)
                return f"error: {exc}"

    return run


@_quiet
def loader_batch(cfg: config.RunConfig) -> Any:
    """The first batch of the training loader, its length and class count."""
    loader = build_train_loader(cfg.data, CTX, cfg.seed, None)
    loader.set_epoch(0)
    views, labels = next(iter(loader))
    return {"views": views, "labels": labels, "len": len(loader), "classes": loader.num_classes}  # sizes may differ


@_quiet
def model_forward(cfg: config.RunConfig) -> Any:
    """The model's modules, parameter shapes, output, and how often a block runs in forward + backward."""
    torch.manual_seed(0)
    model = models.build(cfg.model, None, cfg.data.image_size)
    calls = []
    for block in models.blocks(model.encoder):  # a block recomputed in backward calls its modules again
        for module in block.modules():
            module.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.sum().backward()
    return {
        "modules": [type(m).__name__ for m in model.modules()],
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
        "out": out.detach(),
        "block_calls": len(calls),
    }


def _engine(cfg: config.RunConfig, model: torch.nn.Module | None = None) -> engines.Engine:
    torch.manual_seed(0)
    model = model or models.build(cfg.model, None, cfg.data.image_size)
    total, warmup = trainer.schedule_steps(cfg.train, 4)
    return engines.build(EngineSpec.from_run(cfg), CTX, model, total, warmup)


@_quiet
def engine_steps(cfg: config.RunConfig) -> Any:
    """Three optimizer steps of the engine on a fixed batch: the weights, the group LRs, the forward's dtype."""
    engine = _engine(cfg)
    engine.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    target = torch.randn(8, cfg.model.feat_dim, generator=g)
    dtypes = []
    for _ in range(3):
        with engine.autocast():
            out = engine(x)
        dtypes.append(str(out.dtype))
        engine.backward((out.float() - target).pow(2).sum())
        engine.step()
    weight = next(p for p in engine.unwrapped().parameters() if p.ndim == 4)
    return {
        "weights": {k: v.detach().clone() for k, v in engine.unwrapped().state_dict().items()},
        "lrs": [g["lr"] for g in engine.optimizer.param_groups],
        "dtypes": dtypes,
        "scaler": engine.scaler.is_enabled(),
        "channels_last": weight.is_contiguous(memory_format=torch.channels_last),
    }


@_quiet
def sibling_steps(cfg: config.RunConfig) -> Any:
    """Two engine steps with the update hooks trainer.build adds: the whole state (siblings included) and the keys."""
    torch.manual_seed(0)
    engine = _engine(cfg, models.build(cfg.model, None, cfg.data.image_size, cfg.train.ema_decay))
    hooks = averaging.update_hooks(engine.unwrapped(), trainer.schedule_steps(cfg.train, 4)[0])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    target = torch.randn(8, cfg.model.feat_dim, generator=g)
    keys = []
    for step in (1, 2):
        out = engine([x])
        keys.append(out.keys if isinstance(out, models.Output) else None)
        z = out.z if isinstance(out, models.Output) else out
        engine.backward((z.float() - target).pow(2).sum())
        info = StepInfo(step, 0, torch.zeros(()), engine.step(), 8, False, False)
        for hook in hooks:
            hook.on_step(info)
    return {"state": {k: v.detach().clone() for k, v in engine.unwrapped().state_dict().items()}, "keys": keys}


@_quiet
def engine_built(cfg: config.RunConfig) -> Any:
    """Whether the engine's forward module is compiled (not run: compiling takes minutes here).

    `nn.Module.compile()` compiles in place: torch keeps the compiled call in `_compiled_call_impl`."""
    return {"compiled": _engine(cfg).forward_module._compiled_call_impl is not None}


@_quiet
def schedule(cfg: config.RunConfig) -> Any:
    """The LR of every step of the run at 4 steps per epoch, and its step counts."""
    engine = _engine(cfg, torch.nn.Linear(2, 2))
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step(): only the values are read
        total, _ = trainer.schedule_steps(cfg.train, 4)
        for _ in range(total):
            lrs.append(engine.lr)
            engine.scheduler.step()
    return {"steps": trainer.schedule_steps(cfg.train, 4), "lrs": lrs}


@_quiet
def objective_loss(cfg: config.RunConfig) -> Any:
    """The objective's prepared views, targets and loss on fixed views, labels and features."""
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    features = torch.nn.functional.normalize(torch.randn(8, 2, NUM_CLASSES, generator=g), dim=-1)
    objective = objectives.build(cfg, NUM_CLASSES, CTX)
    views, targets = objective.prepare(views, labels)
    return {"views": torch.stack(views), "targets": targets, "loss": objective(features, targets).detach()}


@_quiet
def queued_loss(cfg: config.RunConfig) -> Any:
    """The objective's hooks and its loss on fixed features at the second of two applied steps (a queue, if any,
    then holds the first step's keys)."""
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    objective = objectives.build(cfg, NUM_CLASSES, CTX)
    losses = []
    for step in (1, 2):
        features = torch.randn(8, cfg.data.views, cfg.model.feat_dim, generator=g)
        losses.append(objective(features, labels).detach())
        for hook in objective.hooks():
            hook.on_step(StepInfo(step, 0, losses[-1], True, 16, False, step == 2))
    return {"hooks": [type(h).__name__ for h in objective.hooks()], "loss": losses[-1]}


@_quiet
def run_monitors(cfg: config.RunConfig) -> Any:
    """The monitors trainer.fit adds (at 4 steps per epoch) and their cadence."""
    hooks = trainer.monitors(cfg, _engine(cfg), 4, None)
    return [
        (type(h).__name__, getattr(h, "every", None), getattr(h, "first", None), getattr(h, "last", None))
        for h in hooks
    ]


@_quiet
def model_loss(cfg: config.RunConfig) -> Any:
    """The model trainer.fit builds for the objective (its parameters) and the loss of one forward on fixed views."""
    objective = objectives.build(cfg, NUM_CLASSES, CTX)
    torch.manual_seed(0)
    model = trainer.build_model(cfg, objective)
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(4, 3, cfg.data.image_size, cfg.data.image_size, generator=g) for _ in range(2)]
    out = objectives.per_sample(model(views), 2)
    loss = objective(trainer.loss_input(out), torch.tensor([0, 1, 1, 0]))
    return {"shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()}, "loss": loss.detach()}


@_quiet
def probe_update(cfg: config.RunConfig) -> Any:
    """The log feeders trainer.fit adds (the online probe) and their weights after one step on fixed features."""
    from supcon_scale.hooks import StepInfo

    feeders = trainer.log_feeders(cfg, 6, NUM_CLASSES, CTX)
    g = torch.Generator().manual_seed(5)
    output = models.Output(torch.randn(4, 2, 3, generator=g), features=torch.randn(4, 2, 6, generator=g))
    info = StepInfo(1, 0, torch.tensor(1.0), True, 8, False, False, output, torch.tensor([0, 1, 2, 3]))
    for feeder in feeders:
        feeder.on_step(info)
    return [(type(f).__name__, [p.detach().clone() for p in f.linear.parameters()]) for f in feeders]


@_quiet
def guard_steps(cfg: config.RunConfig) -> Any:
    """How many skipped fp32 steps in a row the non-finite guard lets pass (trainer.fit builds it so)."""
    guard = NonFiniteGuard(cfg.train.max_bad_steps, fp16=cfg.precision == "fp16")
    for step in range(1, 20):
        try:
            guard.update(step, torch.tensor(float("nan")), False, None)
        except NonFiniteError:
            return step
    return None


@_quiet
def preemption(cfg: config.RunConfig) -> Any:
    """Which signals the preemption handler catches."""
    handler = PreemptionHandler(cfg.train.preempt_signal)
    try:
        return [s for s in ("SIGTERM", "SIGUSR1", "SIGUSR2") if signal.getsignal(getattr(signal, s)) == handler._handle]
    finally:
        handler.close()


# --- the walk's tables ----------------------------------------------------------------------------------------

DATA = ["data.root={noise}", "data.global_batch_size=8", "data.image_size=16", "data.workers=0"]
MODEL = ["model.encoder=test_resnet", "model.feat_dim=8", "data.image_size=16"]
ENGINE = [*MODEL, "optim.schedule=constant", "train.warmup_epochs=0", "optim.base_lr=10", "train.epochs=2"]
GENSCL = ["loss.name=genscl"]
TEACHER = [*GENSCL, "kd.teacher=test_resnet", "kd.checkpoint={teacher0}"]
RANDAUG = [*DATA, "data.augment.preset=randaugment"]
MULTICROP = [*DATA, "data.views=3", "data.view_sizes=[16, 12, 12]"]

# key: (probe, context overrides, other value) or (probe, context, first value, second value)
EFFECTS: dict[str, tuple] = {
    "seed": (loader_batch, DATA, "5"),
    "precision": (engine_steps, ENGINE, "bf16"),
    "data.root": (loader_batch, DATA, "{other}"),
    "data.backend": (loader_batch, DATA, "synthetic"),
    "data.global_batch_size": (loader_batch, DATA, "4"),
    "data.views": (loader_batch, DATA, "3"),
    "data.image_size": (loader_batch, DATA, "20"),
    "data.num_classes": (loader_batch, DATA, "9"),
    "data.drop_last": (loader_batch, [*DATA, "data.global_batch_size=16"], "false"),
    "data.sampler": (loader_batch, DATA, "m_per_class"),
    "data.m_per_class": (loader_batch, [*DATA, "data.sampler=m_per_class"], "2"),
    "data.on_bad_file": (loader_batch, [*DATA, "data.root={bad}"], "fail"),
    "data.view_sizes": (loader_batch, [*DATA, "data.views=3"], "null", "[16, 12, 12]"),
    "data.augment.small_crop_scale": (loader_batch, MULTICROP, "[0.5, 0.6]"),
    "data.augment.preset": (loader_batch, DATA, "randaugment"),
    "data.augment.crop_scale": (loader_batch, DATA, "[0.5, 0.6]"),
    "data.augment.flip_p": (loader_batch, DATA, "0.0"),
    "data.augment.jitter": (loader_batch, DATA, "[0.9, 0.9, 0.9, 0.3]"),
    "data.augment.jitter_p": (loader_batch, DATA, "0.0"),
    "data.augment.grayscale_p": (loader_batch, DATA, "1.0"),
    "data.augment.blur_p": (loader_batch, DATA, "0.0"),
    "data.augment.randaugment_n": (loader_batch, RANDAUG, "4"),
    "data.augment.randaugment_m": (loader_batch, RANDAUG, "25"),
    "data.augment.mean": (loader_batch, DATA, "[0.1, 0.2, 0.3]"),
    "data.augment.std": (loader_batch, DATA, "[0.5, 0.5, 0.5]"),
    "model.encoder": (model_forward, MODEL, "resnet10t"),
    "model.head": (model_forward, MODEL, "linear"),
    "model.head_hidden_dim": (model_forward, MODEL, "12"),
    "model.feat_dim": (model_forward, MODEL, "6"),
    "model.sync_bn": (model_forward, MODEL, "true"),
    "model.channels_last": (engine_steps, ENGINE, "false"),
    "model.activation_checkpointing": (model_forward, MODEL, "true"),
    "model.cifar_stem": (model_forward, MODEL, "true"),
    "model.kwargs": (model_forward, MODEL, '{"stem_width": 8}'),
    "model.head_hidden_layers": (model_forward, MODEL, "2"),
    "model.head_batch_norm": (model_forward, MODEL, "true"),
    "model.head_bias": (model_forward, MODEL, "false"),
    "model.normalize_encoder_output": (model_forward, MODEL, "true"),
    "loss.name": (objective_loss, [], "simclr"),
    "loss.temperature": (objective_loss, [], "0.5"),
    "loss.variant": (objective_loss, [], "in"),
    "loss.contrast": (objective_loss, [], "one"),
    "loss.scale": (objective_loss, [], "temperature"),
    "loss.base_temperature": (objective_loss, ["loss.scale=base_temperature"], "0.5"),
    "loss.label_smoothing": (objective_loss, ["loss.name=cross_entropy"], "0.3"),
    "loss.denominator_mode": (objective_loss, [], "one_positive"),
    "loss.positives_cap": (objective_loss, [], "1"),
    "loss.ce_weight": (model_loss, MODEL, "0.5"),
    "loss.queue_size": (queued_loss, ["model.feat_dim=8"], "4"),
    "optim.name": (engine_steps, ENGINE, "sgd"),
    "optim.base_lr": (engine_steps, ENGINE, "1"),
    "optim.scale_lr": (engine_steps, [*ENGINE, "data.global_batch_size=8"], "false"),
    "optim.weight_decay": (engine_steps, ENGINE, "0.1"),
    "optim.momentum": (engine_steps, ENGINE, "0.5"),
    "optim.betas": (engine_steps, [*ENGINE, "optim.name=adamw"], "[0.5, 0.9]"),
    "optim.eps": (engine_steps, [*ENGINE, "optim.name=adamw"], "0.1"),
    "optim.layer_decay": (engine_steps, ENGINE, "0.5"),
    "optim.nesterov": (engine_steps, [*ENGINE, "optim.name=sgd"], "true"),
    "optim.trust_coeff": (engine_steps, ENGINE, "0.1"),
    "optim.exclude_bn_bias": (engine_steps, ENGINE, "false"),
    "optim.schedule": (schedule, [], "constant"),
    "optim.final_lr_fraction": (schedule, [], "0.5"),
    "train.epochs": (schedule, [], "50"),
    "train.max_steps": (schedule, [], "100"),
    "train.warmup_epochs": (schedule, [], "2.5"),
    "train.knn_every_epochs": (run_monitors, [*MODEL, "data.root={noise}"], "1", "2"),
    "train.profile_steps": (run_monitors, MODEL, "2-4", "3-3"),
    "train.max_bad_steps": (guard_steps, [], "2"),
    "train.online_probe": (probe_update, [], "true"),
    "train.online_probe_lr": (probe_update, ["train.online_probe=true"], "0.5"),
    "train.ema_decay": (sibling_steps, ENGINE, "0.5", "0.9"),
    "model.momentum": (sibling_steps, ENGINE, "0.5", "0.99"),
    "train.compile": (engine_built, MODEL, "true"),
    "train.preempt_signal": (preemption, [], "SIGUSR1"),
    "mix.mixup_alpha": (objective_loss, GENSCL, "1.0"),
    "mix.cutmix_alpha": (objective_loss, GENSCL, "1.0"),
    "mix.prob": (objective_loss, [*GENSCL, "mix.mixup_alpha=1.0"], "0.3"),
    "mix.switch_prob": (objective_loss, [*GENSCL, "mix.mixup_alpha=1.0", "mix.cutmix_alpha=1.0"], "0.0"),
    "kd.teacher": (objective_loss, [*GENSCL, "kd.checkpoint={teacher0}"], "null", "test_resnet"),
    "kd.checkpoint": (objective_loss, TEACHER, "{teacher0}", "{teacher1}"),
    "kd.temperature": (objective_loss, TEACHER, "4.0"),
    "kd.alpha": (objective_loss, TEACHER, "0.25"),
}

# key: why the walk cannot see it in one CPU process, and where its effect is tested instead.
ELSEWHERE: dict[str, str] = {
    "out_dir": "where the run writes: tests/test_trainer.py, tests/test_checkpoint.py",
    "device": "without a GPU auto is the CPU; cuda is refused there: tests/test_gpu_ready.py, tests/test_launch.py",
    "tf32": "a CUDA matmul/cuDNN policy (engines.cuda_settings returns on the CPU): gpu-check on a GPU",
    "data.format": "the reader of shards/CIFAR archives: tests/test_data_shards.py, tests/test_data_cifar.py",
    "data.manifest": "where the bad-file scan's manifest is read and written: tests/test_data_badfiles.py",
    "data.workers": "the same batches at any worker count by design (per-sample seeds): tests/test_data_torchvision.py",
    "data.dali_threads": "DALI's CPU thread count: batches are the same by design (tests/test_data_dali.py)",
    "data.hw_decoder_load": "DALI's share of JPEG decoding on the GPU's hardware decoder: a GPU pipeline only",
    "data.eval_crop": "the evaluation view of linear/finetune: tests/test_evaluation_linear.py",
    "model.init_from": "needs an exported encoder: tests/test_models.py",
    "loss.impl": "dense and tiled give the same numbers by design, only memory differs: tests/test_losses.py",
    "train.log_every": "the cadence of metrics lines: tests/test_console.py, tests/test_trainer.py",
    "train.checkpoint_every_steps": "the checkpoint cadence of trainer.fit: tests/test_reliability.py",
    "train.keep_last": "checkpoints kept in out_dir: tests/test_checkpoint.py",
    "train.resume": "which checkpoint a run continues from: tests/test_trainer.py, tests/test_reliability.py",
    "train.progress": "what rank 0 prints: tests/test_console.py",
    "train.allow_changes": "what a resume may change: tests/test_reliability.py, tests/test_hostile_runs.py",
    "engine.name": "fsdp and deepspeed need a process group: tests/test_engines.py",
    "engine.backend": "the process group's backend (distributed.init): tests/test_launch.py",
    "engine.zero_stage": "DeepSpeed's ZeRO stage: tests/test_engines.py",
    "engine.deepspeed_config": "merged into DeepSpeed's config: tests/test_engines.py",
    "log.plain": "what rank 0 prints: tests/test_commands.py",
    "log.timing": "the time shares in the metrics lines: tests/test_console.py",
    "log.tensorboard": "a TensorBoard sink in out_dir: tests/test_console.py",
    "log.wandb": "a W&B sink in out_dir: tests/test_console.py",
    "log.wandb_project": "the W&B run's project name (a W&B sink): tests/test_console.py",
    "log.wandb_mode": "W&B offline or online: tests/test_commands.py",
}


def test_every_key_is_walked() -> None:
    """A key neither probed nor listed fails here: a new key needs a probe or a reason."""
    keys = [k.key for k in config.schema()]
    missing = [k for k in keys if k not in EFFECTS and k not in ELSEWHERE]
    assert not missing, f"config keys with no effect check and no reason: {missing}"
    assert not set(EFFECTS) & set(ELSEWHERE)
    assert set(EFFECTS) | set(ELSEWHERE) <= set(keys), "the tables name keys the schema no longer has"


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.equal(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


DEFAULTS = {k.key: k.default for k in config.schema()}


@pytest.mark.parametrize("key", sorted(EFFECTS))
def test_key_changes_what_it_reaches(key: str, paths: dict[str, str]) -> None:
    probe, context, *values = EFFECTS[key]
    first, second = values if len(values) == 2 else (_yaml(DEFAULTS[key]), values[0])
    if isinstance(DEFAULTS[key], tuple | dict) and len(values) == 1:
        first = _flow(DEFAULTS[key])
    cfgs = [config.load(None, [_fill(c, paths) for c in (*context, f"{key}={v}")]) for v in (first, second)]
    a, b = (probe(cfg) for cfg in cfgs)
    assert not (isinstance(a, str) and isinstance(b, str)), f"{key}: both values refused: {a} / {b}"
    assert not _same(a, b), f"{key}={first} and {key}={second} give the same {probe.__name__}"


def _fill(text: str, paths: dict[str, str]) -> str:
    """`{name}` in an override replaced by the fixture's path of that name."""
    for name, path in paths.items():
        text = text.replace("{" + name + "}", path)
    return text


def _flow(value: Any) -> str:
    """A tuple or dict default as a YAML flow value."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(str(v) for v in value) + "]"
