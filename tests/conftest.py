import os
import sys
from pathlib import Path

import pytest

# Multi-process tests import helpers from this folder in spawned ranks.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The costlier twins listed in slow_tier.py run in `make test-slow` (see its docstring)."""
    from slow_tier import SLOW_TWINS

    for item in items:
        if item.nodeid in SLOW_TWINS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """The demo digits cut to 24 training images per class (240 images), so a training run takes seconds."""
    from supcon_scale.data.folder import make_demo_data

    root = make_demo_data(tmp_path_factory.mktemp("small_digits"))
    for folder in (root / "train").iterdir():
        for extra in sorted(folder.iterdir())[24:]:
            extra.unlink()
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The demo digits (1,437 training images as JPEGs in the ImageNet layout)."""
    from supcon_scale.data.folder import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def coded(tmp_path_factory) -> Path:
    """40 uniform-colour PNGs whose colour codes (class, item): see tests/data_images.py."""
    from data_images import write_coded

    return write_coded(tmp_path_factory.mktemp("coded"))
