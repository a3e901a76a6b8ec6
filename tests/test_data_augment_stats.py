"""Each augmentation parameter of both backends against an independent reference (issue 28, item 3).

Views are measured on images where the parameter's effect is computable: a colour gradient (R = 4x+2, G = 4y+2)
reveals each view's crop box, flip and grayscale; a constant colour its brightness, saturation and hue factors; a grey
ramp its contrast factor; a checkerboard whether it was blurred. Every parameter runs at a non-default value and is
checked against its formula: rates with a binomial test, factors with a KS test against the uniform law the
parameter defines, crops against a float64 brute force of Inception's random-resized-crop, RandAugment against
torchvision's and DALI's own RandAugment at the same n and m. DALI's CPU pipelines are built once per module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from supcon_scale.bench import augment
from supcon_scale.data.spec import AugmentSpec, preset

# DALI's own rand_augment (the reference) calls its deprecated aliases; test_data_dali.py checks that ours does not
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ALPHA = 1e-3  # each test's false-alarm rate; its fixed seeds make it deterministic anyway
N = 300  # views per measurement
SOURCE = 64  # gradient side (px)
VIEW = 32  # view side of the geometric tests (px)
SMALL = 16  # view side of the colour tests (px)
GRAY = np.array([0.2989, 0.587, 0.114])  # torchvision's luma weights
# Non-default values, so a parameter replaced by its default fails.
GEOMETRY = dict(crop_scale=(0.2, 0.5), crop_ratio=(0.5, 2.0), flip_p=0.3, grayscale_p=0.3)
STRENGTH = {"brightness": 0.5, "contrast": 0.6, "saturation": 0.7, "hue": 0.2}
JITTER_P = 0.4
BLUR_P = 0.3
BLUR_SIGMA = (0.8, 1.6)
RANDAUGMENT = [(1, 24), (3, 3)]  # (n, m), each also checked against the other's reference


@functools.cache
def photos() -> list[np.ndarray]:
    """scikit-learn's two photographs at the view size (decoded once)."""
    return augment.photos(VIEW)


def _gradient() -> np.ndarray:
    ramp = (4 * np.arange(SOURCE) + 2).astype(np.uint8)
    img = np.zeros((SOURCE, SOURCE, 3), np.uint8)
    img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
    return img


def _constant() -> np.ndarray:
    return np.broadcast_to(np.array([150, 100, 60], np.uint8), (SMALL, SMALL, 3)).copy()


def _grey_ramp() -> np.ndarray:
    ramp = np.linspace(64, 191, SMALL).round().astype(np.uint8)
    return np.repeat(np.broadcast_to(ramp[None, :, None], (SMALL, SMALL, 1)), 3, axis=2).copy()


def _line() -> np.ndarray:
    """One white column on black: a blurred view's rows are the Gaussian kernel."""
    img = np.zeros((SMALL, SMALL, 3), np.uint8)
    img[:, SMALL // 2] = 255
    return img


def _checkerboard() -> np.ndarray:
    cells = (np.arange(SMALL)[:, None] // 2 + np.arange(SMALL)[None, :] // 2) % 2
    return np.repeat((cells * 200 + 28).astype(np.uint8)[..., None], 3, axis=2)


def _plain(stages: tuple[str, ...], size: int = SMALL, **overrides: object) -> AugmentSpec:
    """`stages` only: whole-image crop, no flip, identity normalisation, so a view is its pixels / 255."""
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    return replace(preset("none", size), stages=stages, **{**base, **overrides})


def geometry_spec() -> AugmentSpec:
    return replace(preset("simclr", VIEW), jitter_p=0.0, blur_p=0.0, mean=(0.0,) * 3, std=(1.0,) * 3, **GEOMETRY)


def colour_specs() -> dict[str, AugmentSpec]:
    """One spec per colour parameter, each with that parameter alone at a non-default value."""
    specs = {}
    for i, name in enumerate(STRENGTH):
        jitter = tuple(STRENGTH[name] if j == i else 0.0 for j in range(4))
        specs[name] = _plain(("jitter",), jitter=jitter, jitter_p=1.0)
    specs["jitter_p"] = _plain(("jitter",), jitter=(0.5, 0.0, 0.0, 0.0), jitter_p=JITTER_P)
    specs["blur"] = _plain(("blur",), blur_p=BLUR_P, blur_sigma=(1.0, 2.0))  # sigma >= 1 changes every checker
    specs["blur_sigma"] = _plain(("blur",), blur_p=1.0, blur_sigma=BLUR_SIGMA)
    for n, m in RANDAUGMENT:
        specs[f"randaugment_{n}_{m}"] = _plain(("randaugment",), size=VIEW, randaugment_n=n, randaugment_m=m)
    return specs


def colour_source(name: str) -> list[np.ndarray]:
    if name == "contrast":
        return [_grey_ramp()]
    if name == "blur_sigma":
        return [_line()]
    if name == "blur":
        return [_checkerboard()]
    if name.startswith("randaugment"):
        return photos()
    return [_constant()]


def _torchvision(transform: Callable, images: list[np.ndarray], seed: int) -> np.ndarray:
    """N views [N, S, S, 3] in 0..255 (float64), view i of image i % k."""
    pil = [Image.fromarray(im) for im in images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = [transform(pil[i % len(pil)]) for i in range(N)]
    return np.stack([v.permute(1, 2, 0).numpy() for v in views]).astype(np.float64) * 255.0


def _run(pipe, outputs: int) -> list[np.ndarray]:
    """N views per output of a DALI pipeline with a batch of N / 3."""
    runs = [pipe.run() for _ in range(3)]
    return [np.concatenate([np.asarray(r[k].as_tensor()) for r in runs]) for k in range(outputs)]


def _repeat(sample: np.ndarray) -> Callable:
    """A DALI source of batches of N / 3 copies of `sample` (DALI rejects a callback with a default argument)."""
    return lambda info: ([sample] * (N // 3), np.zeros(N // 3, np.int32))


def _cycle(images: list[np.ndarray]) -> Callable:
    """A DALI source of batches of N / 3 images cycling through `images`."""
    return lambda: [images[i % len(images)] for i in range(N // 3)]


def _hwc(chw: np.ndarray) -> np.ndarray:
    return chw.transpose(0, 2, 3, 1).astype(np.float64) * 255.0


@pytest.fixture(scope="module")
def geometry_torchvision() -> np.ndarray:
    """Gradient views of the geometry spec through the torchvision backend's transform."""
    from supcon_scale.data.torchvision import view_transform

    return _torchvision(view_transform(geometry_spec()), [_gradient()], seed=1)


@pytest.fixture(scope="module")
def geometry_dali() -> dict[str, np.ndarray]:
    """Gradient views of the geometry spec through DALI's training pipeline, on arrays (CIFAR) and on PNG files."""
    import io

    from supcon_scale.data import dali

    spec, image = geometry_spec(), _gradient()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    png = np.frombuffer(buf.getvalue(), np.uint8)
    out = {}
    for name, sample, raw in (("arrays", image, True), ("files", png, False)):
        pipe = dali.build_pipeline(
            _repeat(sample),
            spec,
            views=1,
            batch_size=N // 3,
            device="cpu",
            device_id=None,
            num_threads=1,
            seed=2,
            raw=raw,
        )
        out[name] = _hwc(_run(pipe, 1)[0])
    return out


def geometry_views(request: pytest.FixtureRequest, backend: str) -> np.ndarray:
    if backend == "torchvision":
        return request.getfixturevalue("geometry_torchvision")
    return request.getfixturevalue("geometry_dali")[backend.removeprefix("dali-")]


def measure_geometry(views: np.ndarray) -> dict[str, np.ndarray]:
    """Per view: grey or not, flipped or not, crop width and height as fractions of the source side.

    Output column j samples source x = x0 + (j + 1/2) w / S, so columns 0 and S-1 differ by 4 w (S-1)/S in R.
    """
    s = views.shape[1]
    left, right = views[:, :, 0, 0].mean(1), views[:, :, -1, 0].mean(1)
    top, bottom = views[:, 0, :, 1].mean(1), views[:, -1, :, 1].mean(1)
    return {
        "gray": np.abs(views[..., 0] - views[..., 2]).max(axis=(1, 2)) < 3.0,
        "flip": left > right,
        "w": np.abs(right - left) / 4 * s / (s - 1) / SOURCE,
        "h": np.abs(bottom - top) / 4 * s / (s - 1) / SOURCE,
    }


def reference_crops(scale: tuple[float, float], ratio: tuple[float, float], n: int = 100_000) -> np.ndarray:
    """(w, h) fractions of Inception-style random-resized-crop (torchvision's), float64 brute force, [n, 2]."""
    rng = np.random.default_rng(0)
    area = SOURCE * SOURCE * rng.uniform(*scale, size=(n, 10))
    r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(n, 10)))
    w, h = np.round(np.sqrt(area * r)), np.round(np.sqrt(area / r))
    ok = (w > 0) & (w <= SOURCE) & (h > 0) & (h <= SOURCE)
    first, rows = ok.argmax(axis=1), np.arange(n)
    wh = np.stack([w[rows, first], h[rows, first]], axis=1)
    return np.where(ok.any(axis=1)[:, None], wh, SOURCE) / SOURCE


BACKENDS_GEOMETRY = ["torchvision", "dali-arrays", "dali-files"]


@pytest.mark.parametrize("backend", BACKENDS_GEOMETRY)
def test_flip_and_grayscale_rates_match_their_probabilities(request, backend):
    m = measure_geometry(geometry_views(request, backend))
    gray = int(m["gray"].sum())
    assert stats.binomtest(gray, N, GEOMETRY["grayscale_p"]).pvalue > ALPHA, gray / N
    flips = int(m["flip"][~m["gray"]].sum())
    assert stats.binomtest(flips, N - gray, GEOMETRY["flip_p"]).pvalue > ALPHA, flips / (N - gray)


@pytest.mark.parametrize("backend", BACKENDS_GEOMETRY)
def test_crop_area_and_aspect_ratio_follow_the_scale_and_ratio_ranges(request, backend):
    m = measure_geometry(geometry_views(request, backend))
    colour = ~m["gray"]
    w, h = m["w"][colour], m["h"][colour]
    ref = reference_crops(GEOMETRY["crop_scale"], GEOMETRY["crop_ratio"])
    assert stats.ks_2samp(w * h, ref[:, 0] * ref[:, 1]).pvalue > ALPHA
    assert stats.ks_2samp(np.log(w / h), np.log(ref[:, 0] / ref[:, 1])).pvalue > ALPHA
    lo, hi = GEOMETRY["crop_scale"]
    assert lo - 0.03 < (w * h).min() and (w * h).max() < hi + 0.03  # the range itself, pixel rounding aside


@pytest.fixture(scope="module")
def colour_torchvision() -> dict[str, np.ndarray]:
    """N views per colour spec through the torchvision backend's transform."""
    from supcon_scale.data.torchvision import view_transform

    return {
        name: _torchvision(view_transform(spec), colour_source(name), seed=3) for name, spec in colour_specs().items()
    }


@pytest.fixture(scope="module")
def colour_dali() -> dict[str, np.ndarray]:
    """N views per colour spec from one DALI CPU pipeline with a branch per spec.

    The DALI branches run the backend's graph after the crop (`augment_view`); the RandAugment ones also run DALI's
    own `rand_augment` at the same n and m (the reference, key `reference_<n>_<m>`).
    """
    import nvidia.dali as dali
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    from supcon_scale.data.dali import augment_view

    specs = colour_specs()
    batch = N // 3

    @dali.pipeline_def(enable_conditionals=True)
    def branches():
        out = []
        for name, spec in specs.items():
            images = colour_source(name)
            x = fn.external_source(source=_cycle(images), batch=True, layout="HWC", dtype=types.UINT8)
            out.append(augment_view(x, spec))
            if name.startswith("randaugment"):
                reference = rand_augment.rand_augment(
                    x, spec.randaugment_n, spec.randaugment_m, shape=(VIEW, VIEW), interp_type=types.INTERP_NN
                )
                out.append(fn.transpose(fn.cast(reference, dtype=types.FLOAT), perm=[2, 0, 1]) / 255.0)
        return tuple(out)

    pipe = branches(batch_size=batch, num_threads=1, device_id=None, seed=4)
    pipe.build()
    results = iter(_run(pipe, len(specs) + len(RANDAUGMENT)))
    out = {}
    for name in specs:
        out[name] = _hwc(next(results))
        if name.startswith("randaugment"):
            out[name.replace("randaugment", "reference")] = _hwc(next(results))
    return out


def colour_views(request: pytest.FixtureRequest, backend: str) -> dict[str, np.ndarray]:
    return request.getfixturevalue(f"colour_{backend}")


def _factor(name: str, views: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Each view's factor (or hue shift, a fraction of the circle) for the colour parameter `name`."""
    if name == "brightness":
        return views.mean(axis=(1, 2, 3)) / source.mean()
    if name == "contrast":
        return views.std(axis=(1, 2, 3)) / source.std()
    pixel, src = views[:, 0, 0], source[0, 0]  # constant images: one pixel says it all
    chroma, chroma0 = pixel - (pixel @ GRAY)[:, None], src - src @ GRAY
    if name == "saturation":
        return np.linalg.norm(chroma, axis=1) / np.linalg.norm(chroma0)
    raise AssertionError(name)


def _hue_shift(backend: str, views: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The hue rotation of each constant view: HSV hue for torchvision, the YIQ chroma angle for DALI (its hue)."""
    pixel, src = views[:, 0, 0] / 255.0, source[0, 0].astype(np.float64) / 255.0
    if backend == "torchvision":
        import colorsys

        shift = np.array([colorsys.rgb_to_hsv(*p)[0] for p in pixel]) - colorsys.rgb_to_hsv(*src)[0]
    else:
        yiq = np.array([[0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])  # I, Q rows of RGB -> YIQ
        iq, iq0 = pixel @ yiq.T, yiq @ src
        shift = (np.arctan2(iq[:, 1], iq[:, 0]) - np.arctan2(iq0[1], iq0[0])) / (2 * np.pi)
    return (shift + 0.5) % 1.0 - 0.5


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
@pytest.mark.parametrize("name", list(STRENGTH))
def test_each_jitter_strength_draws_its_uniform_factor(request, backend, name):
    """Factors uniform in [1 - s, 1 + s] (hue shifts in [-h, h] of the circle), as torchvision's ColorJitter."""
    views, source = colour_views(request, backend)[name], colour_source(name)[0].astype(np.float64)
    s = STRENGTH[name]
    if name == "hue":
        values, law = _hue_shift(backend, views, source), stats.uniform(-s, 2 * s)
    else:
        values, law = _factor(name, views, source), stats.uniform(1 - s, 2 * s)
    assert stats.kstest(values, law.cdf).pvalue > ALPHA, (values.min(), values.max())


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_jitter_probability_is_the_rate_of_jittered_views(request, backend):
    factors = _factor("brightness", colour_views(request, backend)["jitter_p"], _constant().astype(np.float64))
    jittered = int((np.abs(factors - 1) > 0.02).sum())  # a factor within 0.02 of 1 has probability 0.04
    assert stats.binomtest(jittered, N, JITTER_P * 0.96).pvalue > ALPHA, jittered / N


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_blur_probability_is_the_rate_of_blurred_views(request, backend):
    blurred = int((np.abs(colour_views(request, backend)["blur"] - _checkerboard()).max(axis=(1, 2, 3)) > 20).sum())
    assert stats.binomtest(blurred, N, BLUR_P).pvalue > ALPHA, blurred / N


def _change(views: np.ndarray, images: list[np.ndarray]) -> np.ndarray:
    """Per view: mean absolute difference from its source, 0..255."""
    sources = np.stack([images[i % len(images)] for i in range(len(views))]).astype(np.float64)
    return np.abs(views - sources).mean(axis=(1, 2, 3))


@functools.cache
def _torchvision_randaugment(n: int, m: int, seed: int) -> np.ndarray:
    from torchvision.transforms import v2

    reference = v2.Compose([v2.PILToTensor(), v2.RandAugment(num_ops=n, magnitude=m, num_magnitude_bins=31)])
    return _torchvision(lambda im: reference(im).float() / 255.0, photos(), seed)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
@pytest.mark.parametrize(("n", "m"), RANDAUGMENT)
def test_randaugment_matches_the_libraries_own_at_n_and_m(request, backend, n, m):
    """The backend's views against torchvision's `RandAugment(n, m)` / DALI's `rand_augment(n, m)`.

    Power check: the same statistic tells them from torchvision's RandAugment at the other (n, m) of the list (a
    swapped n and m costs 24 operations a view; the swap planted in either backend fails the first assertion).
    """
    images = photos()
    views = colour_views(request, backend)[f"randaugment_{n}_{m}"]
    if backend == "torchvision":
        reference = _torchvision_randaugment(n, m, seed=5)
    else:
        reference = colour_views(request, backend)[f"reference_{n}_{m}"]
    assert stats.ks_2samp(_change(views, images), _change(reference, images)).pvalue > ALPHA
    (other,) = [case for case in RANDAUGMENT if case != (n, m)]
    assert (
        stats.ks_2samp(_change(views, images), _change(_torchvision_randaugment(*other, seed=5), images)).pvalue < ALPHA
    )


def test_dali_blur_sigma_is_uniform_over_its_range(request):
    """DALI sizes its window from sigma (2 ceil(3 sigma) + 1 taps), so a blurred line's spread is sigma itself.

    torchvision's kernel is SimCLR's 10% of the side (3 taps at 16 px), which truncates the Gaussian: its rate only
    is checked above.
    """
    rows = colour_views(request, "dali")["blur_sigma"][:, SMALL // 2, :, 0]  # [N, S]: one row of each view
    x = np.arange(SMALL) - SMALL // 2
    weight = rows / rows.sum(axis=1, keepdims=True)
    sigma = np.sqrt((weight * x**2).sum(axis=1))
    lo, hi = BLUR_SIGMA
    assert stats.kstest(sigma, stats.uniform(lo, hi - lo).cdf).pvalue > ALPHA, (sigma.min(), sigma.max())
