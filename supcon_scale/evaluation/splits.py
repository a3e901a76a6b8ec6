"""Where a train split meets an evaluation split: both exist and hold the same class folders, checked up front.

Labels are class-folder positions in sorted order (`data.folder.index_folder`), so one extra class folder in `val/`
(even an empty one) or a missing one shifts every label after it and the accuracy is silently wrong. These checks
read only the two folder listings, so they run before any model is loaded or any image decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

SHOWN = 5  # differing class names listed in a message before "and N more"


def class_folders(directory: str | Path, flag: str) -> list[str]:
    """The class folders of a split, as `index_folder` reads them; a ValueError naming `flag` when it has none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{flag}: directory not found: {directory}")
    with os.scandir(directory) as it:  # the rule of data.folder.index_folder: directories, hidden ones left out
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{flag}: no class folders in {directory}")
    return classes


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def class_difference(train: object, a: list[str], val: object, b: list[str]) -> str:
    """'only in VAL: x, y; only in TRAIN: z' for two class lists (`train` and `val` name where each came from)."""
    only_val, only_train = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    parts = [f"only in {where}: {_names(names)}" for where, names in ((val, only_val), (train, only_train)) if names]
    return "; ".join(parts) or "the same names in another order"


def check_same_classes(train: str | Path, val: str | Path, flag: str) -> list[str]:
    """The class folders shared by `train` and `val`; a one-line ValueError naming `flag`, both folders and the
    differing classes when the lists differ in any way."""
    a, b = class_folders(train, flag), class_folders(val, flag)
    if a != b:
        diff = class_difference(train, a, val, b)
        raise ValueError(f"{flag}: the class folders of {train} and {val} differ ({diff})")
    return a


def check_splits(root: str | Path, flag: str, train: str = "train", val: str = "val") -> list[str]:
    """`root/train` and `root/val` exist and hold the same class folders (see `check_same_classes`)."""
    return check_same_classes(Path(root) / train, Path(root) / val, flag)
