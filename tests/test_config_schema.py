"""The config schema walked key by key: every numeric key refuses out-of-range and non-finite values by name, in
the loader and through the CLI, and any value of any type either loads or names its key (hypothesis)."""

import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supcon_scale import cli, config

REPO = Path(__file__).resolve().parents[1]
KEYS = config.schema()
NUMERIC = [k for k in KEYS if k.range is not None]


def _scalar(tp: typing.Any) -> typing.Any:
    """The number type of a key: int or float, under `| None` and inside a tuple."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _scalar(args[0]) if args else tp


def _outside(rng: config.Range) -> list[float]:
    """Values just outside `rng`, and the non-finite ones it refuses."""
    out = [b - 1 for b in (rng.ge,) if b is not None] + [b for b in (rng.gt, rng.lt) if b is not None]
    out += [b + 1 for b in (rng.le,) if b is not None]
    return out


def _cases() -> list[tuple[str, str, str]]:
    """(key, override value, the name the message must hold) for every bad value of every numeric key."""
    cases = []
    for k in NUMERIC:
        is_float = _scalar(k.type) is float
        ranges = k.range if isinstance(k.range, tuple) else None
        n = len(typing.get_args(k.type)) if typing.get_origin(k.type) is tuple else 0
        for i in range(n) if n else [None]:
            rng = ranges[i] if ranges else k.range
            bad = [repr(v) for v in _outside(rng)]
            if is_float:
                bad += [".nan", "-.inf"] + ([] if rng.inf else [".inf"])
            for v in bad:
                if i is None:
                    cases.append((k.key, v, k.key))
                else:
                    items = [repr(x) for x in k.default]
                    items[i] = v
                    cases.append((k.key, f"[{', '.join(items)}]", f"{k.key}[{i}]"))
    return cases


def test_every_key_is_described_and_every_number_has_a_range():
    assert len(KEYS) > 60 and len({k.key for k in KEYS}) == len(KEYS)
    for k in KEYS:
        assert k.help and "\n" not in k.help, k.key
        if _scalar(k.type) in (int, float):
            assert k.range is not None, f"{k.key}: a number without a declared range"
            assert k.range_text, k.key
        assert k.type_name
    described = {k.key: (k.type_name, k.default, k.range_text) for k in KEYS}
    assert described["optim.momentum"] == ("float", 0.9, "in [0, 1)")
    assert described["kd.alpha"] == ("float", 1.0, ">= 0, or inf")
    assert described["data.num_classes"] == ("int | null", None, ">= 1")
    assert described["precision"] == ("str", "fp32", "one of fp32, bf16, fp16")
    assert described["data.augment.jitter"][2] == "[0] >= 0; [1] >= 0; [2] >= 0; [3] in [0, 0.5]"


def test_defaults_are_in_range():
    config.check_run(config.RunConfig())  # check_run re-checks every key against the schema
    for k in NUMERIC:
        values = k.default if isinstance(k.default, tuple) else (k.default,)
        ranges = k.range if isinstance(k.range, tuple) else (k.range,) * len(values)
        for v, rng in zip(values, ranges, strict=True):
            assert v is None or rng.problem(v) is None, k.key


@pytest.mark.parametrize("key, value, name", _cases(), ids=lambda x: str(x))
def test_out_of_range_value_names_the_key(key: str, value: str, name: str):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [f"{key}={value}"])
    assert str(err.value).startswith(name + " "), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        *("train.log_every=0", "mix.prob=1.5", "kd.temperature=0", "data.workers=-2", "optim.momentum=-1"),
        *("data.augment.jitter=[0.4,0.4,0.4,0.9]", "loss.temperature=inf"),
    ],
)
def test_cli_refuses_the_issue_values(override: str, capsys: pytest.CaptureFixture[str]):
    """`supcon-scale train` in this process (a subprocess each costs seconds of imports; one runs below)."""
    assert cli.main(["train", "--config", "demo/digits", override]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and override.split("=")[0] in err, err


def test_cli_exits_2_with_one_line(tmp_path: Path):
    override = "optim.base_lr=.nan"
    proc = subprocess.run(
        [sys.executable, "-m", "supcon_scale.cli", "train", "--config", "demo/digits",
         f"out_dir={tmp_path / 'run'}", override],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and override.split("=")[0] in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


# Values of every type, bounded so that a case takes milliseconds: numbers at and beyond the 64-bit range,
# non-finite floats, text, lists and mappings.
_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.one_of(
    _atoms,
    st.lists(_atoms, max_size=5),
    st.dictionaries(st.text(max_size=6), _atoms, max_size=3),
)


def _nested(key: str, value: typing.Any) -> dict[str, typing.Any]:
    *sections, leaf = key.split(".")
    raw: dict[str, typing.Any] = {leaf: value}
    for s in reversed(sections):
        raw = {s: raw}
    return raw


def _loads_or_names(k: config.Key, load: typing.Callable[[], config.RunConfig]) -> None:
    try:
        cfg = load()
    except config.ConfigError as exc:
        assert k.key in str(exc) and "\n" not in str(exc), (k.key, str(exc))
        return
    assert config.from_dict(cfg.to_dict()) == cfg  # what loaded is a valid config: it round-trips
    node: typing.Any = cfg
    for part in k.key.split("."):
        node = getattr(node, part)
    for x in node if isinstance(node, tuple) else (node,):
        assert not isinstance(x, float) or math.isfinite(x) or (x == math.inf and k.range.inf), (k.key, x)


_budget = settings(
    max_examples=300, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow]
)  # the deadline (ms) is the "never a hang" bound of each case


@_budget
@given(st.sampled_from(KEYS), _values)
def test_any_value_loads_or_names_the_key(k: config.Key, value: typing.Any):
    _loads_or_names(k, lambda: config.from_dict(_nested(k.key, value)))


@_budget
@given(st.sampled_from(KEYS), st.text(max_size=30))
def test_any_override_text_loads_or_names_the_key(k: config.Key, text: str):
    _loads_or_names(k, lambda: config.load(None, [f"{k.key}={text}"]))
