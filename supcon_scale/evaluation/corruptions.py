"""The 15 ImageNet-C corruptions (+4 extra) from the `imagecorruptions` package, made to run on current libraries.

imagecorruptions 1.1.2 (the last release) breaks on today's stack in three places, fixed here without touching the
installed package: it imports `pkg_resources` (gone from recent setuptools) only to locate its frost images, its
fog uses `np.float_` (removed in NumPy 2), and its gaussian/glass blur pass `multichannel=True` to scikit-image
(removed in 0.21; `channel_axis=-1` is the same thing). Its impulse noise draws from an unseeded scikit-image
generator; here it is seeded from NumPy's so every corruption is reproducible. The arithmetic is the package's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
import zlib
from typing import Any

import numpy as np

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions refuses smaller images

_module: Any = None


def _resource_filename(module: str, resource: str) -> str:
    """pkg_resources' meaning: `resource` relative to the directory of `module` (a module, not only a package)."""
    from pathlib import Path

    origin = importlib.util.find_spec(module).origin
    return str(Path(origin).parent / resource.removeprefix("./"))


def _plasma_fractal(mapsize: int = 256, wibbledecay: float = 3) -> np.ndarray:
    """imagecorruptions' diamond-square height map, verbatim except `np.float64` for the removed `np.float_`."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * np.random.uniform(-wibble, wibble, array.shape)

    def fillsquares() -> None:
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(squareaccum)

    def filldiamonds() -> None:
        size = maparray.shape[0]
        drgrid = maparray[stepsize // 2 : size : stepsize, stepsize // 2 : size : stepsize]
        ulgrid = maparray[0:size:stepsize, 0:size:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:size:stepsize, stepsize // 2 : size : stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[stepsize // 2 : size : stepsize, 0:size:stepsize] = wibbledmean(ttsum)

    while stepsize >= 2:
        fillsquares()
        filldiamonds()
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def _impulse_noise(x: Any, severity: int = 1) -> np.ndarray:
    """imagecorruptions' salt-and-pepper noise, with scikit-image's generator seeded from NumPy's global one:
    the original leaves `random_noise` unseeded, so its output could never be reproduced."""
    from skimage.util import random_noise

    c = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    x = random_noise(np.array(x) / 255.0, mode="s&p", amount=c, rng=int(np.random.randint(2**31)))
    return np.clip(x, 0, 1) * 255


def _load() -> Any:
    """Import imagecorruptions once, with the three compatibility fixes described in the module docstring."""
    global _module
    if _module is not None:
        return _module
    shim = None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module("imagecorruptions.corruptions")
    except ImportError as exc:
        raise ImportError(
            f"corruptions need the robustness extra ({exc}): pip install 'supcon_scale[robustness]'"
        ) from None
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]  # only imagecorruptions saw the shim; nobody else is misled by it
    from skimage.filters import gaussian

    def gaussian_compat(
        image: np.ndarray, sigma: float = 1.0, multichannel: bool | None = None, **kw: Any
    ) -> np.ndarray:
        if multichannel:
            kw["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kw)

    mod.gaussian = gaussian_compat
    mod.plasma_fractal = _plasma_fractal
    mod.impulse_noise = _impulse_noise
    _module = mod
    return mod


def image_seed(seed: int, key: str, corruption: str, severity: int) -> int:
    """A reproducible seed per (image, corruption, severity), independent of worker count and processing order."""
    words = [seed, zlib.crc32(key.encode("utf-8", "surrogateescape")), ALL_CORRUPTIONS.index(corruption), severity]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def corrupt(image: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt an RGB uint8 image `[H, W, 3]` (H, W >= 32); same shape and dtype out, deterministic for `seed`.

    The package draws from NumPy's global generator, so it is seeded here (and restored) around the call.
    """
    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"corruption: unknown name {corruption!r}; choose from {', '.join(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity: must be one of 1..5, got {severity}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt: expected an RGB uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"corrupt: image {image.shape[:2]} is smaller than {MIN_SIDE}x{MIN_SIDE}; upscale it first")
    from PIL import Image

    mod = _load()
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = getattr(mod, corruption)(Image.fromarray(image), severity)
    finally:
        np.random.set_state(state)
    out = np.asarray(out)
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    out = np.clip(out, 0, 255).astype(np.uint8)  # truncation, as imagecorruptions and the ImageNet-C scripts do
    return out[: image.shape[0], : image.shape[1], :3]
