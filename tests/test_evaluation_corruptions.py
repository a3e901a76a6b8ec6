"""Corruption generation on real photographs, the "-C" directory reader, generation cache and reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supcon_scale.evaluation.c_dataset import generate_c, index_c
from supcon_scale.evaluation.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph (scikit-learn's bundled china.jpg), centre 96x128 crop to keep the test fast."""
    from sklearn.datasets import load_sample_images

    img = load_sample_images().images[0]
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[h // 2 - 48 : h // 2 + 48, w // 2 - 64 : w // 2 + 64])


def test_names_are_the_15_standard_and_4_extra():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert set(ALL_CORRUPTIONS) == set(CORRUPTIONS) | set(EXTRA_CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_and_severity_on_a_real_photo(photo, name):
    outs = []
    for severity in range(1, 6):
        out = corrupt(photo, name, severity, seed=123)
        assert out.shape == photo.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, corrupt(photo, name, severity, seed=123))  # deterministic per seed
        outs.append(out.astype(np.float64))
    # each corruption changes the image, and the strongest severity changes it more than the mildest
    d1, d5 = np.abs(outs[0] - photo).mean(), np.abs(outs[4] - photo).mean()
    assert d1 > 0.1 and d5 > d1 * 0.99


def test_random_corruptions_depend_on_the_seed_and_leave_global_rng_alone(photo):
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    a, b = corrupt(photo, "gaussian_noise", 3, seed=1), corrupt(photo, "gaussian_noise", 3, seed=2)
    assert np.abs(a.astype(int) - b).mean() > 1
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_bad_inputs_raise_value_errors(photo):
    with pytest.raises(ValueError, match="unknown name"):
        corrupt(photo, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(photo, "fog", 6)
    with pytest.raises(ValueError, match="smaller than 32"):
        corrupt(photo[:16, :16], "fog", 1)


def _tiny_dataset(root: Path, photo: np.ndarray, size: int = 24) -> Path:
    """Two classes, two real-photo crops each, deliberately smaller than imagecorruptions' 32 px minimum."""
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(2):
            crop = photo[i * 20 : i * 20 + 48, c * 40 : c * 40 + 48]
            Image.fromarray(crop).resize((size, size)).save(root / f"class{c}" / f"img{i}.png")
    return root


def test_generate_tiny_images_reproducible_cached_and_parallel(tmp_path, photo):
    src = _tiny_dataset(tmp_path / "src", photo)
    names, sev = ["frost", "glass_blur", "zoom_blur", "gaussian_noise"], [1, 5]
    one = generate_c(src, tmp_path / "c1", corruptions=names, severities=sev, workers=1, seed=3)
    assert one["written"] == 4 * len(names) * len(sev) and one["cached"] == 0
    two = generate_c(src, tmp_path / "c2", corruptions=names, severities=sev, workers=2, seed=3)
    assert two["written"] == one["written"] and two["cached"] == 0
    for c in names:
        for s in sev:
            for f in sorted((tmp_path / "c1" / c / str(s)).rglob("*.jpg")):
                rel = f.relative_to(tmp_path / "c1")
                a, b = np.asarray(Image.open(f)), np.asarray(Image.open(tmp_path / "c2" / rel))
                assert a.shape == (24, 24, 3)  # shrunk back after corrupting at the 32 px work size
                np.testing.assert_array_equal(a, b)  # same seed, any worker count: same pixels
    again = generate_c(src, tmp_path / "c1", corruptions=names, severities=sev, workers=1, seed=3)
    assert again["written"] == 0 and again["cached"] == one["written"]
    with pytest.raises(ValueError, match="other settings"):
        generate_c(src, tmp_path / "c1", corruptions=names, severities=sev, workers=1, seed=4)
    index = index_c(tmp_path / "c1", names, sev)
    assert len(index) == len(names) * len(sev) and all(len(ix) == 4 for ix in index.values())


def test_reader_names_the_missing_corruption_or_severity(tmp_path, photo):
    src = _tiny_dataset(tmp_path / "src", photo)
    generate_c(src, tmp_path / "c", corruptions=["fog", "contrast"], severities=[1, 2], workers=1)
    with pytest.raises(ValueError, match=r"missing corruption folder .*frost"):
        index_c(tmp_path / "c", ["fog", "frost"], [1, 2])
    with pytest.raises(ValueError, match=r"missing severity folder .*fog/3"):
        index_c(tmp_path / "c", ["fog"], [1, 2, 3])
    with pytest.raises(ValueError, match="directory not found"):
        index_c(tmp_path / "nope", ["fog"], [1])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_reaches_the_corruption(photo, name):
    """Each severity gives its own image (same seed), and level 5 is further from the photo than level 1, strictly."""
    outs = [corrupt(photo, name, s, seed=7).astype(np.float64) for s in range(1, 6)]
    assert not np.array_equal(outs[0], outs[4])
    assert np.abs(outs[4] - photo).mean() > np.abs(outs[0] - photo).mean()
