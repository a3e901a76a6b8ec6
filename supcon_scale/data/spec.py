"""AugmentSpec: one backend-neutral description of a training view, built from `data.augment` (FACTS.md section 3).

The preset picks which operations run and in which order; the config fields give their values, so every value is
overridable and an operation is switched off by setting its probability to 0. Both the DALI and the torchvision
backends build their pipelines from this object only, so they apply the same augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from supcon_scale.config import AugmentConfig

# Which colour/photometric stages each preset runs, in order, after random-resized-crop and flip.
PRESET_STAGES: dict[str, tuple[str, ...]] = {
    "simclr": ("jitter", "grayscale", "blur"),
    "randaugment": ("randaugment",),
    # SimCLR jitter -> RandAugment: the data-loading benchmark's spec (issue "Data", FACTS.md section 5).
    "jitter_randaugment": ("jitter", "randaugment"),
    # The paper's ResNet-200 recipe: SimCLR jitter -> RandAugment -> grayscale -> blur (FACTS.md section 3).
    "stacked_randaugment": ("jitter", "randaugment", "grayscale", "blur"),
    "autoaugment": ("autoaugment",),
    "none": (),
}


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """A training view: random-resized-crop to `image_size`, flip, then `stages` in order, then normalisation."""

    image_size: int
    stages: tuple[str, ...]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    randaugment_n: int = 2
    randaugment_m: int = 9
    randaugment_bins: int = 31  # magnitudes 0..30 (FACTS.md section 5)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def blur_kernel(self) -> int:
        """SimCLR's odd kernel of about 10% of the image side."""
        k = max(3, int(0.1 * self.image_size))
        return k if k % 2 else k + 1

    def has(self, stage: str) -> bool:
        return stage in self.stages


def spec_from_config(aug: AugmentConfig, image_size: int) -> AugmentSpec:
    """The AugmentSpec for `data.augment` at `data.image_size`."""
    if aug.preset not in PRESET_STAGES:
        raise ValueError(f"data.augment.preset: unknown preset {aug.preset!r}; choose one of {sorted(PRESET_STAGES)}")
    return AugmentSpec(
        image_size=image_size,
        stages=PRESET_STAGES[aug.preset],
        crop_scale=tuple(aug.crop_scale),
        flip_p=aug.flip_p,
        jitter=tuple(aug.jitter),
        jitter_p=aug.jitter_p,
        grayscale_p=aug.grayscale_p,
        blur_p=aug.blur_p,
        randaugment_n=aug.randaugment_n,
        randaugment_m=aug.randaugment_m,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
    )


def preset(name: str, image_size: int = 224, **overrides: object) -> AugmentSpec:
    """A preset by name with optional field overrides (benchmarks and tests)."""
    fields = {k: v for k, v in overrides.items() if k in AugmentConfig.__dataclass_fields__}
    spec = spec_from_config(AugmentConfig(preset=name, **fields), image_size)  # type: ignore[arg-type]
    rest = {k: v for k, v in overrides.items() if k not in fields}
    return AugmentSpec(**{**spec.__dict__, **rest}) if rest else spec
