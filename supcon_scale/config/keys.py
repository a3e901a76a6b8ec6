"""Declaring config keys: `key(...)` (default, one-line help, valid range), `Range`, and `ConfigError`, the one-line
error naming a dotted key that every check raises."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the dotted key."""


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def _short(value: Any) -> str:
    """A bounded one-line repr: a message never formats a huge (or alias-expanded) value in full."""
    try:
        return _repr.repr(value)
    except ValueError:  # an int beyond str()'s digit limit
        return f"<{type(value).__name__} too large to print>"


def _name(value: Any) -> str:
    """A key or path as written when it is short and printable, else its bounded repr (messages stay one line)."""
    text = str(value) if isinstance(value, (str, Path)) else _short(value)
    return text if text.isprintable() and len(text) <= 200 else _short(text)


# ---------------------------------------------------------------------------------------------------------------
# Declaring keys


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


@dataclass(frozen=True)
class Range:
    """The valid values of a number: optional bounds, and whether +inf is meaningful (otherwise it must be finite)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    inf: bool = False

    def __str__(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + lo[1:]
        elif hi:
            text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        else:
            text = "finite"
        return f"{text}, or inf" if self.inf else text

    def problem(self, x: float) -> str | None:
        """Why `x` is not valid, or None."""
        if math.isnan(x) or (math.isinf(x) and not (self.inf and x > 0)):
            if self.inf:
                return f"must be {self}"
            return f"must be a finite number ({self})" if str(self) != "finite" else "must be finite"
        ok = (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )
        return None if ok else f"must be {self}"


PROBABILITY = Range(ge=0, le=1)
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
COUNT = Range(ge=1)


def key(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    inf: bool = False,
    items: tuple[Range, ...] | None = None,
    nonempty: bool = False,
) -> Any:
    """A config key: its default, one-line `help`, and its range (bounds apply to every item of a tuple key).

    `items` gives one Range per item of a tuple key instead; `nonempty` refuses "" for a string key.
    """
    bounds: Range | tuple[Range, ...] | None = items
    if bounds is None and any(b is not None for b in (ge, gt, le, lt)):
        bounds = Range(ge=ge, gt=gt, le=le, lt=lt, inf=inf)
    metadata = {"help": help, "range": bounds, "nonempty": nonempty}
    if isinstance(default, dict):  # a mapping key: each config gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)
