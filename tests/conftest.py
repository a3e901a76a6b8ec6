import os
import sys
from pathlib import Path

import pytest

# Multi-process tests import helpers from this folder in spawned ranks.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """The demo digits cut to 24 training images per class (240 images), so a training run takes seconds."""
    from supcon_scale.data.folder import make_demo_data

    root = make_demo_data(tmp_path_factory.mktemp("small_digits"))
    for folder in (root / "train").iterdir():
        for extra in sorted(folder.iterdir())[24:]:
            extra.unlink()
    return root
