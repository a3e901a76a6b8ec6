"""Config loading: inheritance, overrides, and one-line errors that name the dotted key."""

import dataclasses
from pathlib import Path

import pytest

from supcon_scale import config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_paper():
    cfg = config.load(None)
    assert cfg.loss.variant == "out"  # L_in scored 67.4% vs 78.7% (SupCon paper, Table 1): never the default
    assert cfg.loss.temperature == 0.1
    assert cfg.data.augment.crop_scale == (0.08, 1.0)


def test_base_inheritance_and_overrides(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("seed: 3\ndata:\n  views: 4\n  global_batch_size: 64\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndata:\n  views: 2\n")
    cfg = config.load(tmp_path / "child.yaml", ["loss.temperature=0.5", "train.resume=auto", "optim.name=sgd"])
    assert (cfg.seed, cfg.data.views, cfg.data.global_batch_size) == (3, 2, 64)
    assert cfg.loss.temperature == 0.5 and cfg.train.resume == "auto" and cfg.optim.name == "sgd"


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = config.load(REPO / "supcon_scale/recipes/demo/digits.yaml", ["seed=7"])
    config.save(cfg, tmp_path / "config.yaml")
    assert config.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.temprature=1", "unknown config key loss.temprature (did you mean loss.temperature?)"),
        ("optim.lars=1", "unknown config key optim.lars"),
        ("loss.temperature=0", "loss.temperature must be > 0"),
        ("loss.temperature=-0.1", "loss.temperature must be > 0"),
        ("data.views=two", "data.views must be int, got str 'two'"),
        ("loss.variant=sideways", "loss.variant must be one of out, in"),
        ("precision=fp8", "precision must be one of fp32, bf16, fp16"),
        ("data.augment.crop_scale=[0.5,0.1]", "data.augment.crop_scale must satisfy"),
        ("data.augment.crop_scale=0.5", "data.augment.crop_scale must be a list of 2 values"),
        ("train.keep_last=0", "train.keep_last must be >= 1"),
        ("train.warmup_epochs=500", "train.warmup_epochs must be in [0, epochs=100]"),
        ("noequals", "must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_batch_not_divisible_by_world():
    cfg = config.load(None, ["data.global_batch_size=10"])
    with pytest.raises(config.ConfigError, match="data.global_batch_size=10 is not divisible by the world size 3"):
        config.check_run(cfg, world_size=3)


def test_missing_file_and_cycle(tmp_path: Path):
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(config.ConfigError, match="cycle"):
        config.load(tmp_path / "a.yaml")


# The training recipes (recipes/continual/ holds the `continual` command's own schema, loaded by its tests).
RECIPES = sorted(
    p for d in ("imagenet", "cifar", "demo") for p in (REPO / "supcon_scale" / "recipes" / d).rglob("*.yaml")
)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_config_loads(path: Path):
    config.load(path)


@pytest.mark.parametrize(
    "override, message",
    [  # the values issue 13 found loading without a word, and the non-finite ones of issue 20
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("mix.prob=1.5", "mix.prob must be in [0, 1], got 1.5"),
        ("kd.temperature=0", "kd.temperature must be > 0, got 0"),
        ("data.workers=-2", "data.workers must be in [0, 256], got -2"),
        ("optim.momentum=-1", "optim.momentum must be in [0, 1), got -1"),
        ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1"),
        ("optim.base_lr=inf", "optim.base_lr must be a finite number (> 0), got inf"),
        ("loss.temperature=inf", "loss.temperature must be a finite number (> 0), got inf"),
        ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number (>= 0), got nan"),
        ("optim.momentum=nan", "optim.momentum must be a finite number"),
        ("train.warmup_epochs=.nan", "train.warmup_epochs must be a finite number"),
        ("kd.alpha=nan", "kd.alpha must be >= 0, or inf, got nan"),
        ("kd.alpha=-inf", "kd.alpha must be >= 0, or inf, got -inf"),
        ("data.augment.jitter=[0.4,0.4,0.4,0.6]", "data.augment.jitter[3] must be in [0, 0.5], got 0.6"),
        ("data.augment.crop_scale=[0,1]", "data.augment.crop_scale[0] must be in (0, 1], got 0"),
        ("seed=-1", "seed must be >= 0, got -1"),
        ("seed=9223372036854775808", "seed must fit in 64 bits"),
        ("data.global_batch_size=1e3", "data.global_batch_size must be int, got float 1000.0"),
        ("data.views=[1,", "override data.views: invalid YAML"),
        ("data.views=!!python/object/apply:os.system [ls]", "override data.views: invalid YAML"),
        ("out_dir=", "out_dir must not be empty"),
        ("train.epochs=5", "it cannot exceed train.epochs"),  # warm-up 10 > 5: names both keys
    ],
)
def test_out_of_range_and_non_finite_values_name_the_key(override: str, message: str):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_meaningful_infinity_and_float_spellings_load():
    assert config.load(None, ["kd.alpha=inf"]).kd.alpha == float("inf")  # teacher labels only
    assert config.load(None, ["kd.alpha=.inf"]).kd.alpha == float("inf")
    assert config.load(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4  # PyYAML reads 1e-4 as text
    assert config.load(None, ["train.resume=null", "data.num_classes=~"]).train.resume is None


def test_override_value_keeps_comment_characters():
    cfg = config.load(None, ["out_dir=runs/exp #3", "model.encoder=resnet50 # note", "train.resume=a: b"])
    assert cfg.out_dir == "runs/exp #3"
    assert cfg.model.encoder == "resnet50 # note"
    assert cfg.train.resume == "a: b"
    assert config.load(None, ["out_dir=123"]).out_dir == "123"  # a string key takes the text, not a number


def _alias_bomb(levels: int = 10) -> str:
    lines = ["- &a0 [l, l, l, l, l, l, l, l, l, l]"]
    lines += [f"- &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_alias_bomb_is_refused_quickly_in_little_memory(tmp_path: Path):
    import time
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text("out_dir:\n" + _alias_bomb())  # 10**10 values once expanded
    flow = "[" + ", ".join(line[2:] for line in _alias_bomb().splitlines()) + "]"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(config.ConfigError, match="aliases expand to more than"):
            config.load(path)
        with pytest.raises(config.ConfigError, match="override data.augment.mean: invalid YAML .*aliases expand"):
            config.load(None, [f"data.augment.mean={flow}"])
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 100 * 2**20, (elapsed, peak)  # the bound: 1 s, 100 MB


def test_small_aliases_still_load(tmp_path: Path):
    path = tmp_path / "a.yaml"
    path.write_text("data:\n  augment:\n    mean: &m [0.5, 0.5, 0.5]\n    std: *m\n")
    assert config.load(path).data.augment.std == (0.5, 0.5, 0.5)
    path.write_text("out_dir: &a [*a]\n")
    with pytest.raises(config.ConfigError, match="alias refers to a node that contains it"):
        config.load(path)


def test_bad_base_links_and_files(tmp_path: Path):
    for i in range(1500):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n" if i < 1499 else "seed: 1\n")
    with pytest.raises(config.ConfigError, match="`base:` chain is longer than"):
        config.load(tmp_path / "c0.yaml")
    bad = tmp_path / "bad.yaml"
    for text in ("base: 5\n", "base: [a.yaml, b.yaml]\n", "base: ''\n"):
        bad.write_text(text)
        with pytest.raises(config.ConfigError, match="base must be the path of another YAML file"):
            config.load(bad)
    bad.write_text("seed: [\n")
    with pytest.raises(config.ConfigError, match="invalid YAML .*line 2"):
        config.load(bad)
    bad.write_text("- 1\n")
    with pytest.raises(config.ConfigError, match="top level must be a mapping, got list"):
        config.load(bad)
    bad.write_bytes(b"out_dir: \xff\n")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(bad)
    bad.write_text("out_dir: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(config.ConfigError, match="nested too deeply"):
        config.load(bad)
    bad.write_text("seed: 0\n" + "#" * config.MAX_CONFIG_BYTES)
    with pytest.raises(config.ConfigError, match="not a config"):
        config.load(bad)


def test_check_run_holds_the_rules_between_sections():
    from supcon_scale import engines  # the engine rules: engines.check, run by the trainer right after check_run
    from supcon_scale.engines import EngineSpec

    config.check_run(config.load(None), world_size=4, device_type="cpu")
    with pytest.raises(config.ConfigError, match="data.global_batch_size=10 is not divisible by the world size 4"):
        config.check_run(config.load(None, ["data.global_batch_size=10"]), 4, "cuda")
    small_bf16 = config.load(None, ["precision=bf16", "data.image_size=16"])
    engines.check(EngineSpec.from_run(small_bf16), "cuda")
    with pytest.raises(config.ConfigError, match="precision=bf16 with 16 px views"):
        engines.check(EngineSpec.from_run(small_bf16), "cpu")
    with pytest.raises(config.ConfigError, match="data.backend=dali-gpu needs a CUDA GPU"):
        config.check_run(config.load(None, ["data.backend=dali-gpu"]), 1, "cpu")
    # Refusals of the deepspeed engine: loading is fine (tests build engines from such configs), the run is not.
    for overrides, message in (
        (["engine.zero_stage=3"], "engine.zero_stage=3"),
        (["precision=fp16"], "precision=fp16"),
    ):
        cfg = config.load(None, ["engine.name=deepspeed", *overrides])
        with pytest.raises(config.ConfigError, match=message):
            engines.check(EngineSpec.from_run(cfg))
    engines.check(EngineSpec.from_run(config.load(None, ["engine.zero_stage=3"])))  # ZeRO's stage means nothing to ddp


def test_check_run_checks_a_config_built_in_python():
    cfg = config.RunConfig(train=config.TrainConfig(log_every=0))
    with pytest.raises(config.ConfigError, match="train.log_every must be >= 1"):
        config.check_run(cfg, 1, "cpu")
    with pytest.raises(config.ConfigError, match="train.log_every must be >= 1"):
        config.check_run(cfg)


def test_one_augmentation_type_and_constants_once():
    from typing import get_args, get_type_hints

    from supcon_scale.data import eval as eval_data
    from supcon_scale.data.spec import PRESET_STAGES, AugmentSpec, preset, spec_from_config

    assert set(PRESET_STAGES) == set(get_args(get_type_hints(config.AugmentConfig)["preset"]))
    aug = config.load(None, ["data.augment.preset=stacked_randaugment", "data.augment.blur_p=0.25"]).data.augment
    spec = spec_from_config(aug, 32)
    assert isinstance(spec, config.AugmentConfig) and isinstance(spec, AugmentSpec)
    for f in dataclasses.fields(config.AugmentConfig):  # every config key reaches the backends unchanged
        assert getattr(spec, f.name) == getattr(aug, f.name), f.name
    assert spec.image_size == 32 and spec.stages == ("jitter", "randaugment", "grayscale", "blur")
    assert spec.blur_kernel == 3 and spec.has("blur") and not spec.has("autoaugment")
    assert preset("none", 16, flip_p=0.0).stages == () and preset("simclr").mean == config.IMAGENET_MEAN
    assert eval_data.IMAGENET_MEAN is config.IMAGENET_MEAN and eval_data.IMAGENET_STD is config.IMAGENET_STD
    assert config.AugmentConfig().std == config.IMAGENET_STD
    with pytest.raises(ValueError, match="data.augment.preset: unknown preset"):
        AugmentSpec(preset="sideways", image_size=32)  # type: ignore[arg-type]
