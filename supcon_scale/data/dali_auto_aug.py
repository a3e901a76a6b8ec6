"""RandAugment and AutoAugment (ImageNet policy) for DALI pipelines: DALI's own suite and policy with two changes.

1. Rotate, shear and translate use nearest-neighbour sampling, torchvision's default; DALI's default (linear)
   `warp_affine` costs ~8x more on the CPU (73 vs 9 ms per 64 views at 224 px, docs/BENCHMARKS.md).
2. DALI 2.4's suite calls `fn.experimental.filter` and `fn.experimental.equalize`, deprecated aliases whose warning
   DALI forces on inside its own `catch_warnings` (so no filter of ours silences it) on every pipeline build; the
   same augmentations are rebuilt here over `fn.filter` and `fn.equalize`.
"""

from __future__ import annotations

from typing import Any

from nvidia.dali import fn, types
from nvidia.dali.auto_aug import auto_augment, rand_augment
from nvidia.dali.auto_aug.core import Policy, augmentation


def _equalize(data: Any, _: Any) -> Any:
    return fn.equalize(data)


def _sharpness(data: Any, kernel: Any) -> Any:
    return fn.filter(data, kernel)


_CURRENT_OPS = {"equalize": _equalize, "sharpness": _sharpness}


def _current(aug: Any) -> Any:
    """`aug` with the same magnitudes and name, over the current operator where DALI's uses a deprecated alias."""
    op = _CURRENT_OPS.get(aug.name)
    if op is None:
        return aug
    return augmentation(
        op,
        mag_range=aug.mag_range,
        randomly_negate=aug.randomly_negate,
        mag_to_param=aug.mag_to_param,
        param_device=aug.param_device,
        name=aug.name,
    )


def rand_augment_views(x: Any, n: int, m: int, num_magnitude_bins: int, size: int) -> Any:
    """RandAugment n/m over DALI's default 14-operation suite (translations relative to the `size` px view)."""
    suite = [_current(a) for a in rand_augment.get_rand_augment_suite(use_shape=True)]
    return rand_augment.apply_rand_augment(
        suite,
        x,
        n,
        m,
        num_magnitude_bins=num_magnitude_bins,
        shape=(size, size),
        fill_value=128,
        interp_type=types.INTERP_NN,
    )


def auto_augment_views(x: Any, size: int) -> Any:
    """AutoAugment's ImageNet policy (translations relative to the `size` px view)."""
    policy = auto_augment.get_image_net_policy(use_shape=True)
    # One replacement per augmentation object: the policy treats distinct objects as distinct operations.
    swapped = {aug: _current(aug) for sub in policy.sub_policies for aug, _, _ in sub}
    policy = Policy(
        policy.name,
        policy.num_magnitude_bins,
        [[(swapped[aug], p, mag) for aug, p, mag in sub] for sub in policy.sub_policies],
    )
    return auto_augment.apply_auto_augment(policy, x, shape=(size, size), fill_value=128, interp_type=types.INTERP_NN)
