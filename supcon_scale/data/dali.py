"""The DALI backend: encoded samples in the epoch plan's order + decode + V augmented views, on the GPU or the CPU.

One pipeline serves the whole run: `fn.external_source` asks `PlanFeed` for each step's batch of this rank, the
same order as the torchvision backend (`EpochPlan`), from an image folder, tar shards (byte ranges) or CIFAR's
arrays alike, and runs on from one epoch into the next, so no epoch pays for a new pipeline and an empty prefetch
queue (building one costs about a second on a CPU, more on a GPU; docs/BENCHMARKS.md). The pipeline is built with
`enable_checkpointing=True`, so a saved position rebuilds it and continues with the same remaining batches. The GPU
and CPU pipelines share `augment_view`; only the decoder device differs, so the CPU tests cover the GPU graph.
Multi-crop views (`data.view_sizes`) each have their own spec (size, crop scale): one decode and one branch per view.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.sharding import FolderCursor
from supcon_scale.data.spec import AugmentSpec, same_views

log = logging.getLogger(__name__)

# True: every view is its own sample (each file listed V times, one region-of-interest decode per view, one batch
# of V*B through every operator). False: decode once and take V random-resized-crops in V branches of the graph.
# Measured by tools/bench_dataloader.py on a 2-core CPU (docs/BENCHMARKS.md, "Data loading"): the batched ROI layout
# is ~13% faster, because RandAugment's conditionals split a batch per operation and V branches double the calls.
ROI_DECODE_DEFAULT = True
READER = "Reader"


def _dali() -> Any:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"data.backend=dali needs NVIDIA DALI: pip install supcon_scale[dali] ({exc})"
        ) from None
    import nvidia.dali as dali

    return dali


def resolve_device(backend: str, ctx: distributed.Context) -> str:
    """'gpu' or 'cpu' for data.backend dali | dali-cpu | dali-gpu on this process."""
    has_gpu = ctx.device.type == "cuda" and torch.cuda.is_available()
    if backend == "dali-cpu":
        return "cpu"
    if backend == "dali-gpu":
        if not has_gpu:
            raise ValueError("data.backend=dali-gpu needs a CUDA GPU but this process has none (use dali or dali-cpu)")
        return "gpu"
    if backend == "dali":
        return "gpu" if has_gpu else "cpu"
    raise ValueError(f"data.backend: {backend!r} is not a DALI backend")


def _coin_bool(p: float) -> Any:
    from nvidia.dali import fn, types

    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _uniform(lo: float, hi: float) -> Any:
    """A per-sample uniform draw; a constant for an empty range (a jitter strength of 0), which DALI rejects."""
    from nvidia.dali import fn

    return fn.random.uniform(range=(lo, hi)) if hi > lo else float(lo)


def augment_view(x: Any, spec: AugmentSpec) -> Any:
    """The spec's stages after the crop, then flip + normalise to float CHW; runs on CPU or GPU DataNodes alike."""
    return flip_normalise(apply_stages(x, spec), spec)


def apply_stages(x: Any, spec: AugmentSpec) -> Any:
    """The spec's colour/RandAugment stages on uint8 HWC crops, in order."""
    from nvidia.dali import fn

    from supcon_scale.data.dali_auto_aug import auto_augment_views, rand_augment_views

    for stage in spec.stages:
        if stage == "jitter":
            if _coin_bool(spec.jitter_p):
                x = color_jitter(x, *spec.jitter)
        elif stage == "grayscale":
            if _coin_bool(spec.grayscale_p):
                x = fn.color_twist(x, saturation=0.0)
        elif stage == "blur":
            if _coin_bool(spec.blur_p):
                # No window_size: DALI sizes each sample's window from its sigma (2*ceil(3 sigma)+1, at most 13 taps
                # for sigma <= 2) instead of SimCLR's fixed 10%-of-side kernel whose outer taps are ~0 anyway;
                # 3x fewer taps at 224 px, the costliest CPU op in the profile otherwise.
                x = fn.gaussian_blur(x, sigma=_uniform(*spec.blur_sigma))
        elif stage == "randaugment":
            x = rand_augment_views(x, spec.randaugment_n, spec.randaugment_m, spec.randaugment_bins, spec.image_size)
        elif stage == "autoaugment":
            x = auto_augment_views(x, spec.image_size)
        else:  # pragma: no cover - PRESET_STAGES and this list are kept in step
            raise AssertionError(f"unknown stage {stage}")
    return x


# torchvision's grayscale weights (ITU-R 601-2 luma): its contrast blends towards their mean over the image.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def color_jitter(x: Any, brightness: float, contrast: float, saturation: float, hue: float) -> Any:
    """torchvision's `ColorJitter` on uint8 HWC crops: the four ops in an order drawn per sample, each clamped.

    As torchvision (and the official code's jitter) does: factors uniform in [max(0, 1 - s), 1 + s], hue a fraction
    of the circle in [-h, h], contrast about the grayscale mean of the image as it stands when contrast runs, every
    op rounded and saturated to uint8, an op of strength 0 skipped. The order is the ranks of uniform keys (a uniform
    permutation); each of the k x k branches runs only on the samples that take it. One difference remains: DALI's
    hue rotates chroma in YIQ, torchvision's shifts H in HSV (docs/RECIPES.md, "Augmentation").
    """
    from nvidia.dali import fn, types

    def factor(s: float) -> Any:
        return _uniform(max(0.0, 1.0 - s), 1.0 + s)

    def contrast_about_mean(x: Any) -> Any:
        # Arithmetic, not fn.contrast: its `contrast_center` is a named argument, which DALI takes from the CPU only,
        # and on the GPU the mean is a GPU tensor. The cast back to uint8 rounds and saturates, as fn.contrast does.
        xf = fn.cast(x, dtype=types.FLOAT)
        m = fn.reductions.mean(xf, axes=[0, 1])
        gray = GRAY_WEIGHTS[0] * m[0] + GRAY_WEIGHTS[1] * m[1] + GRAY_WEIGHTS[2] * m[2]
        return fn.cast(gray + factor(contrast) * (xf - gray), dtype=types.UINT8)

    table = [
        (brightness, lambda x: fn.brightness(x, brightness=factor(brightness))),
        (contrast, contrast_about_mean),
        (saturation, lambda x: fn.saturation(x, saturation=factor(saturation))),
        (hue, lambda x: fn.hue(x, hue=_uniform(-360.0 * hue, 360.0 * hue))),
    ]
    ops = [op for strength, op in table if strength > 0]
    if len(ops) <= 1:
        return ops[0](x) if ops else x
    keys = [fn.random.uniform(range=(0.0, 1.0)) for _ in ops]
    ranks = [sum(fn.cast(other < key, dtype=types.INT32) for other in keys if other is not key) for key in keys]
    for slot in range(len(ops)):
        for i, op in enumerate(ops):  # DALI's autograph rewrites zip() without `strict`
            if ranks[i] == slot:
                x = op(x)
    return x


def flip_normalise(x: Any, spec: AugmentSpec) -> Any:
    """Random horizontal flip fused into normalisation to float CHW.

    Flipping last is equivalent to flipping after the crop: every stage is mirror-symmetric in distribution.
    """
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        x,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
        mirror=fn.random.coin_flip(probability=spec.flip_p),
    )


def _crop(spec: AugmentSpec) -> dict[str, Any]:
    """A view's random-resized-crop arguments: its area range (`crop_scale`) and aspect ratios, Inception's 10 tries."""
    return dict(random_area=list(spec.crop_scale), random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)


def crop_views(encoded: Any, specs: Sequence[AugmentSpec], decoder: str, roi: bool, hw_decoder_load: float) -> list:
    """One random-resized-crop per spec, at its `image_size` and `crop_scale`: one decode + the crops, or one ROI
    decode per crop (`roi=True`)."""
    from nvidia.dali import fn, types

    hw = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    if roi:
        return [
            fn.resize(
                fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB, **_crop(spec), **hw),
                size=(spec.image_size, spec.image_size),
                antialias=True,
            )
            for spec in specs
        ]
    image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **hw)
    return [
        fn.random_resized_crop(image, size=(spec.image_size, spec.image_size), antialias=True, **_crop(spec))
        for spec in specs
    ]


def build_pipeline(
    source: Any,
    spec: AugmentSpec | Sequence[AugmentSpec],
    *,
    views: int,
    batch_size: int,
    device: str,
    device_id: int | None,
    num_threads: int,
    seed: int,
    raw: bool = False,
    roi: bool = ROI_DECODE_DEFAULT,
    hw_decoder_load: float = 0.75,
    checkpoint: bytes | None = None,
) -> Any:
    """The V-view training pipeline over the batches `source(BatchInfo)` returns: `(encoded samples, labels)`.

    `source` decides the order (the epoch plan, across epochs), so one pipeline serves the whole run. Outputs
    `(view_0, ..., view_{V-1}, label)` of up to `batch_size` samples, or with `roi` `(views, label)` of V times as
    many, where sample k is view k % V of image k // V (`split_views` undoes it; the source repeats each sample V
    times). `spec` is every view's, or one per view (multi-crop: `spec.view_specs`; `roi` needs them all equal, as
    one batch has one size). `raw`: the samples are HWC uint8 arrays (CIFAR), cropped without a decoder.
    """
    dali = _dali()
    from nvidia.dali import fn, types

    specs = [spec] * views if isinstance(spec, AugmentSpec) else list(spec)
    assert len(specs) == views and (same_views(specs) or not roi), "the ROI layout takes one spec for every view"
    branches = specs[:1] if roi else specs

    @dali.pipeline_def(enable_conditionals=True)
    def v_views():
        encoded, label = fn.external_source(
            source=source, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT32]
        )
        if raw:
            image = encoded.gpu() if device == "gpu" else encoded
            crops = [
                fn.random_resized_crop(image, size=(s.image_size, s.image_size), antialias=True, **_crop(s))
                for s in branches
            ]
        else:
            crops = crop_views(encoded, branches, "mixed" if device == "gpu" else "cpu", roi, hw_decoder_load)
        out = [augment_view(crops[i], s) for i, s in enumerate(branches)]  # autograph's zip() takes no `strict`
        return (*out, label)

    pipe = v_views(
        batch_size=batch_size * views if roi else batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        enable_checkpointing=True,
        checkpoint=checkpoint,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


def split_views(out: dict[str, torch.Tensor], views: int, roi: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """V view tensors [B, C, S, S] and labels [B] from one `build_pipeline` batch (either layout)."""
    if roi:
        return [out["view0"][v::views] for v in range(views)], out["label"].reshape(-1)[::views]
    return [out[f"view{v}"] for v in range(views)], out["label"].reshape(-1)


class PlanFeed:
    """The pipeline's source: DALI's iteration `i` is step `origin + i` of the run, in the epoch plan's order.

    Step `s` is batch `s % steps` of epoch `s // steps`, so the pipeline runs on from one epoch into the next (its
    prefetch queue holds the next epoch's first batches when an epoch ends) and is built once per run. DALI's
    checkpoint restores the iteration and the operators' random state; `origin` travels beside it.
    """

    def __init__(self, samples: Any, plan: Any, seed: int, rank: int, views: int, roi: bool, origin: int):
        self.samples, self.plan, self.seed, self.rank = samples, plan, seed, rank
        self.repeat = views if roi else 1
        self.origin = origin
        self._epoch, self._batches = -1, []

    def batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.plan.steps)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.plan.batches(self.seed, epoch, self.rank)
        return self._batches[b]

    def __call__(self, info: Any) -> tuple[list[np.ndarray], np.ndarray]:
        idx = self.batch(self.origin + info.iteration)
        labels = self.samples.labels
        data = [self.samples.encoded(int(i)) for i in idx for _ in range(self.repeat)]
        return data, np.array([labels[int(i)] for i in idx for _ in range(self.repeat)], dtype=np.int32)


class DaliLoader(FolderCursor):
    """The data contract of docs/DESIGN.md over one long-lived DALI pipeline; see `build_train_loader`.

    The pipeline is built when iteration starts and kept for the next epoch; it is rebuilt only when the wanted
    position is not the one it delivers next (a `load_state_dict`, a jump to another epoch).
    """

    def __init__(
        self,
        cfg: DataConfig,
        ctx: distributed.Context,
        seed: int,
        out_dir: Path | None,
        *,
        roi: bool = ROI_DECODE_DEFAULT,
    ):
        _dali()
        self.device = resolve_device(cfg.backend, ctx)
        self.backend = f"dali-{self.device}"
        super().__init__(cfg, ctx, seed, out_dir)
        # raw arrays: one image, V crops (no decoder to fuse with); multi-crop: one batch holds one size, so V crops
        self.roi = roi and not self.index.raw and same_views(self.specs)
        self._checkpoint: bytes | None = None  # DALI state matching (epoch, position) after load_state_dict
        self._origin = 0  # the step the restored checkpoint's pipeline started from
        self._iter: Any = None
        self._feed: PlanFeed | None = None
        self._next = (-1, -1)  # (epoch, batch) the open pipeline delivers next
        self.pipelines_built = 0  # one per run unless a resume or an epoch jump needs another

    def _reset(self) -> None:
        # set_epoch/_begin_pass call this; the open pipeline survives when it is already at the wanted position.
        if self._next != (self.epoch, self.position):
            self._checkpoint = None

    def _step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.position

    def _open(self) -> Any:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        origin = self._origin if self._checkpoint is not None else self._step()
        self._feed = PlanFeed(self.index, self.plan, self.seed, self.ctx.rank, self.cfg.views, self.roi, origin)
        pipe = build_pipeline(
            self._feed,
            self.specs,
            views=self.cfg.views,
            batch_size=self.local_batch,
            device=self.device,
            device_id=(self.ctx.device.index or 0) if self.device == "gpu" else None,
            num_threads=self.cfg.dali_threads,
            # the epoch the pipeline started in (a restored one keeps the seed it was built with)
            seed=distributed.rank_seed(self.seed, self.ctx.rank, origin // self.steps_per_epoch) % 2**31,
            raw=self.index.raw,
            roi=self.roi,
            hw_decoder_load=self.cfg.hw_decoder_load,
            checkpoint=self._checkpoint,
        )
        names = [f"view{v}" for v in range(1 if self.roi else self.cfg.views)] + ["label"]
        self._checkpoint = None
        self.pipelines_built += 1
        return DALIGenericIterator([pipe], names, size=-1, auto_reset=False, prepare_first_batch=False)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._begin_pass()
        if self._iter is None or self._next != (self.epoch, self.position):
            self._iter = self._open()
        cuda = self.device == "gpu"
        while self.position < self.steps_per_epoch:
            views, labels = split_views(next(self._iter)[0], self.cfg.views, self.roi)
            if cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            labels = labels.to(self.ctx.device, dtype=torch.int64, non_blocking=True)
            self.position += 1
            at_end = self.position == self.steps_per_epoch
            self._next = (self.epoch + 1, 0) if at_end else (self.epoch, self.position)
            yield [v.to(self.ctx.device, non_blocking=True) for v in views], labels

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch + 1 and self.position == self.steps_per_epoch and self._next == (epoch, 0):
            self.epoch, self.position = epoch, 0  # the open pipeline runs on into this epoch
            return
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, int | str | torch.Tensor]:
        """Position plus DALI's serialized pipeline checkpoint as a uint8 tensor (loads with weights_only=True)."""
        state: dict[str, int | str | torch.Tensor] = {
            **self.position_state(),
            "dali_checkpoint": torch.zeros(0, dtype=torch.uint8),
            "dali_origin": 0,
        }
        blob = None
        if self._iter is not None and self.position and self._feed is not None:
            blob, state["dali_origin"] = self._iter.checkpoints()[0], self._feed.origin
        elif self.position and self._checkpoint is not None:
            blob, state["dali_origin"] = self._checkpoint, self._origin
        if blob is not None:
            raw = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else bytes(blob)
            state["dali_checkpoint"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)
        self._iter, self._next = None, (-1, -1)
        blob = state.get("dali_checkpoint")
        same_world = int(state["world_size"]) == self.ctx.world_size
        has_blob = isinstance(blob, torch.Tensor) and blob.numel() > 0
        # Another world size (allowed at an epoch's end only): the random state per rank cannot follow the samples.
        self._checkpoint = bytes(blob.numpy().tobytes()) if has_blob and same_world else None
        self._origin = int(state.get("dali_origin", 0))
        if self._checkpoint is not None and self.position == self.steps_per_epoch:
            # saved at its epoch's end: the restored pipeline runs on into the next epoch, as the saving one did
            self._next = (self.epoch + 1, 0)
        if 0 < self.position < self.steps_per_epoch and self._checkpoint is None:
            raise ValueError("data position is mid-epoch but holds no DALI checkpoint; cannot resume exactly")
