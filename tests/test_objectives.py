"""Objectives: GenSCL label vectors against a float64 brute force, the teacher, heads, resume state, a short run."""

import io
import json
import math
from pathlib import Path

import pytest
import torch

from supcon_scale import checkpoint, config, distributed, objectives, trainer
from supcon_scale.losses import SupConLoss
from supcon_scale.objectives import teacher

REPO = Path(__file__).resolve().parents[1]


def genscl_brute_force(features: torch.Tensor, vectors: torch.Tensor, tau: float) -> torch.Tensor:
    """GenSCL (arXiv 2206.00384) in float64: w_ia = cos(y_i, y_a) (diagonal zeroed),
    L_i = -sum_a w_ia log softmax_a(s_ia) / sum_a w_ia, averaged over anchors with positive weight."""
    b, v, d = features.shape
    z = torch.nn.functional.normalize(features.double().reshape(b * v, d), dim=1)
    y = torch.nn.functional.normalize(vectors.double().reshape(b * v, -1), dim=1)
    m = b * v
    total, count = 0.0, 0
    for i in range(m):
        others = [a for a in range(m) if a != i]
        s = torch.stack([z[i] @ z[a] / tau for a in others])
        log_p = s - torch.logsumexp(s, 0)
        w = torch.stack([y[i] @ y[a] for a in others])
        if w.sum() > 1e-6:
            total = total - (w * log_p).sum() / w.sum()
            count += 1
    return total / count


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_per_view_label_vectors_match_brute_force(impl: str):
    torch.manual_seed(0)
    feats = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    vectors = torch.softmax(torch.randn(6, 2, 4, dtype=torch.float64) * 2, dim=-1)
    loss = SupConLoss(temperature=0.5, impl=impl, block_size=5, name="genscl")(feats, vectors)
    (g,) = torch.autograd.grad(loss, feats)
    ref_feats = feats.detach().clone().requires_grad_(True)
    ref = genscl_brute_force(ref_feats, vectors, 0.5)
    (g_ref,) = torch.autograd.grad(ref, ref_feats)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def digits(small_digits: Path) -> Path:
    return small_digits


def _cfg(digits: Path, out: Path, *extra: str) -> config.RunConfig:
    return config.load(
        REPO / "supcon_scale/recipes/demo/digits.yaml",
        [
            f"data.root={digits}",
            f"out_dir={out}",
            "data.global_batch_size=64",
            "data.image_size=16",
            "train.max_steps=2",
            "train.progress=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def ce_run(digits: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ce")
    trainer.fit(_cfg(digits, out, "loss.name=cross_entropy"), distributed.init(seed=0))
    return out


def test_teacher_is_frozen_and_outputs_distributions(ce_run: Path):
    t = teacher.load(config.KDConfig(teacher=str(ce_run), temperature=2.0), num_classes=10)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    t.train()  # the trainer's mode switches must not reach it
    assert not t.model.training and all(not p.requires_grad for p in t.parameters())
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    probs = t(x)
    assert not probs.requires_grad
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())  # eval mode: BN stats untouched


def test_teacher_must_be_a_classifier(tmp_path: Path, digits: Path):
    trainer.fit(_cfg(digits, tmp_path), distributed.init(seed=0))
    with pytest.raises(ValueError, match="a teacher must be a classifier"):
        teacher.load(config.KDConfig(teacher=str(tmp_path)), num_classes=10)
    with pytest.raises(ValueError, match="kd.checkpoint: the timm teacher resnet18 needs a weights file"):
        teacher.load(config.KDConfig(teacher="resnet18"), num_classes=10)


def test_genscl_run_with_mixing_and_teacher(digits: Path, ce_run: Path, tmp_path: Path):
    cfg = _cfg(
        digits,
        tmp_path,
        "loss.name=genscl",
        "mix.mixup_alpha=0.8",
        "mix.cutmix_alpha=1.0",
        f"kd.teacher={ce_run}",
        "kd.alpha=1.0",
        "kd.temperature=2.0",
    )
    result = trainer.fit(cfg, distributed.init(seed=0))
    assert result.step == 2 and math.isfinite(result.loss)
    meta = json.loads((checkpoint.latest(tmp_path) / "meta.json").read_text())
    assert meta["loss_convention"]["name"] == "genscl" and meta["loss_convention"]["teacher"] is True


def test_objective_prepare_shapes_and_teacher_only(ce_run: Path):
    cfg = config.load(None, ["loss.name=genscl", "mix.mixup_alpha=1.0", f"kd.teacher={ce_run}", "kd.alpha=inf"])
    obj = objectives.build(cfg, num_classes=10, ctx=distributed.Context())
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    labels = torch.tensor([0, 1, 2, 3])
    views, (vectors, soft) = obj.prepare(views, labels)
    assert vectors.shape == (4, 2, 10) and soft.shape == (4, 2, 10)
    feats = torch.randn(4, 2, 8)
    # alpha = inf: the teacher's labels alone
    torch.testing.assert_close(obj(feats, (vectors, soft)), obj.loss(feats, soft))
    tau = cfg.loss.temperature  # loss.scale=none: Eq. 2 as written
    torch.testing.assert_close(obj(feats, (vectors, soft)).double(), genscl_brute_force(feats, soft, tau))


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_genscl_adds_the_teacher_term(ce_run: Path, alpha: float):
    """loss = GenSCL(z, mixed labels) + kd.alpha x GenSCL(z, teacher probabilities), against the float64 brute force."""
    cfg = config.load(None, ["loss.name=genscl", "mix.mixup_alpha=1.0", f"kd.teacher={ce_run}", f"kd.alpha={alpha}"])
    obj = objectives.build(cfg, num_classes=10, ctx=distributed.Context())
    torch.manual_seed(3)
    views, (vectors, soft) = obj.prepare([torch.randn(4, 3, 16, 16) for _ in range(2)], torch.tensor([0, 1, 2, 3]))
    feats = torch.randn(4, 2, 8)
    tau = cfg.loss.temperature
    expected = genscl_brute_force(feats, vectors, tau) + alpha * genscl_brute_force(feats, soft, tau)
    torch.testing.assert_close(obj(feats, (vectors, soft)).double(), expected, rtol=1e-5, atol=1e-6)


def test_mix_options_warn_without_genscl():
    cfg = config.load(None, ["mix.mixup_alpha=1.0"])
    with pytest.warns(UserWarning, match="only act with loss.name=genscl"):
        objectives.build(cfg, num_classes=10, ctx=distributed.Context())


def test_per_sample_puts_each_view_in_its_column():
    views = [torch.randn(5, 3, dtype=torch.bfloat16) for _ in range(3)]
    out = objectives.per_sample(torch.cat(views), len(views))
    assert out.shape == (5, 3, 3) and out.dtype == torch.float32
    for b in range(5):
        for v in range(3):
            assert torch.equal(out[b, v], views[v][b].float())


@pytest.mark.parametrize("name, head", [("supcon", None), ("simclr", None), ("genscl", None), ("cross_entropy", 7)])
def test_objective_decides_the_head(name: str, head: int | None):
    cfg = config.load(None, [f"loss.name={name}"])
    assert objectives.build(cfg, num_classes=7, ctx=distributed.Context()).classifier_classes == head


@pytest.mark.parametrize("name", ["supcon", "genscl", "cross_entropy"])
def test_single_class_needs_simclr(name: str):
    cfg = config.load(None, [f"loss.name={name}", "data.root=/data/single"])
    with pytest.raises(
        ValueError, match=rf"^data.root: /data/single has a single class; loss.name={name} needs at least 2"
    ):
        objectives.build(cfg, num_classes=1, ctx=distributed.Context())
    simclr = config.load(None, ["loss.name=simclr", "data.root=/data/single"])
    assert objectives.build(simclr, num_classes=1, ctx=distributed.Context()).classifier_classes is None


def test_mixing_state_survives_a_restore():
    """A resumed GenSCL run draws the same Mixup/CutMix as an uninterrupted one: restore, then compare exactly."""
    cfg = config.load(None, ["loss.name=genscl", "mix.mixup_alpha=0.8", "mix.cutmix_alpha=1.0", "mix.prob=0.9"])
    torch.manual_seed(0)
    batches = [([torch.randn(6, 3, 12, 12) for _ in range(2)], torch.randint(0, 4, (6,))) for _ in range(4)]
    running = objectives.build(cfg, num_classes=4, ctx=distributed.Context())
    for views, labels in batches[:2]:
        running.prepare(views, labels)
    saved = io.BytesIO()
    torch.save(running.rank_state(), saved)
    saved.seek(0)
    restored = objectives.build(cfg, num_classes=4, ctx=distributed.Context())
    fresh = objectives.build(cfg, num_classes=4, ctx=distributed.Context())
    restored.load_rank_state(torch.load(saved, weights_only=True))
    differs = False
    for views, labels in batches[2:]:
        (a, (va, _)), (b, (vb, _)) = running.prepare(views, labels), restored.prepare(views, labels)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and torch.equal(va, vb)
        assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) == 0.0
        (_c, (vc, _)) = fresh.prepare(views, labels)
        differs |= not torch.equal(vc, va)
    assert differs  # without the restore the draws differ: the state is what makes them equal


def test_unmixed_objectives_have_no_rank_state():
    for name in ("supcon", "simclr", "cross_entropy"):
        obj = objectives.build(config.load(None, [f"loss.name={name}"]), num_classes=4, ctx=distributed.Context())
        assert obj.rank_state() == {}
        obj.load_rank_state({})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_teacher_loads_its_weights_file(tmp_path: Path, suffix: str):
    """kd.teacher=<timm name> with kd.checkpoint=<file>: the teacher holds exactly the file's weights."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model("resnet18", num_classes=10)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"teacher{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    t = teacher.load(config.KDConfig(teacher="resnet18", checkpoint=str(path), temperature=2.0), num_classes=10)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t(x), torch.softmax(model.eval()(x) / 2.0, dim=-1))


# --- one-stage SupCon + cross-entropy (loss.ce_weight) ----------------------------------------------------------


def _ce_model(weight: float):
    cfg = config.load(None, ["model.encoder=test_resnet", "model.feat_dim=8", "data.image_size=16",
                             f"loss.ce_weight={weight}"])  # fmt: skip
    objective = objectives.build(cfg, 3, distributed.Context())
    torch.manual_seed(0)
    return objective, trainer.build_model(cfg, objective)


def test_ce_weight_adds_cross_entropy_of_the_classifier_and_reaches_the_encoder():
    """loss = SupCon(z) + w * CE(logits), CE by hand in float64 over every view (each with its sample's label);
    the classifier is part of the model and the CE's gradient reaches the encoder."""
    objective, model = _ce_model(0.7)
    assert objective.ce_classes == 3 and model.classifier.out_features == 3
    g = torch.Generator().manual_seed(1)
    views, labels = [torch.randn(6, 3, 16, 16, generator=g) for _ in range(2)], torch.tensor([0, 1, 2, 0, 1, 2])
    out = objectives.per_sample(model(views), 2)
    assert out.logits.shape == (6, 2, 3) and out.features is None
    loss = objective(trainer.loss_input(out), labels)
    log_p = torch.log_softmax(out.logits.double(), dim=-1)
    ce = -torch.stack([log_p[i, v, labels[i]] for i in range(6) for v in range(2)]).mean()
    supcon = SupConLoss(temperature=0.1)(out.z, labels)
    assert float(loss) == pytest.approx(float(supcon) + 0.7 * float(ce), rel=1e-6)
    (0.7 * ce).backward()  # the CE term alone: its gradient reaches the classifier and the encoder
    assert model.classifier.weight.grad.abs().sum() > 0
    stem = next(p for p in model.encoder.parameters() if p.ndim == 4)  # the first conv: furthest from the loss
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert objective.uniform_loss(12) is None  # the CE part at collapse is no fixed number


@pytest.mark.parametrize("name", ["simclr", "cross_entropy", "genscl"])
def test_ce_weight_is_refused_without_supcon(name: str):
    cfg = config.load(None, [f"loss.name={name}", "loss.ce_weight=0.5"])
    with pytest.raises(config.ConfigError, match=rf"^loss.ce_weight=0.5: .*needs loss.name=supcon; loss.name={name}"):
        config.check_run(cfg)


@pytest.mark.parametrize("variant, scale", [("out", "none"), ("in", "none"), ("out", "base_temperature")])
def test_uniform_loss_is_the_loss_of_identical_embeddings(variant: str, scale: str):
    """Every embedding the same (total collapse): the loss is log(M - 1), times the loss's scale."""
    cfg = config.load(None, [f"loss.variant={variant}", f"loss.scale={scale}"])
    objective = objectives.build(cfg, 3, distributed.Context())
    z = torch.nn.functional.normalize(torch.ones(8, 2, 4), dim=-1)
    loss = objective(z, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert float(loss) == pytest.approx(objective.uniform_loss(16), rel=1e-6)
    assert objective.uniform_loss(512) == pytest.approx(math.log(511) * (0.1 / 0.07 if scale != "none" else 1))
