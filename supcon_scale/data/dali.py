"""The DALI backend: `fn.readers.file` + decode + V augmented views per image, on the GPU (mixed) or the CPU.

One pipeline per epoch reads the epoch's file list, already shuffled and sharded by `EpochPlan` (the same order as the
torchvision backend): the list is the concatenation of every global rank's samples, so `shard_id=rank,
num_shards=world` gives each rank exactly its share and every file is read once per epoch (drop-last aside). The
pipeline is seeded from (seed, global rank, epoch) and built with `enable_checkpointing=True`, so a saved position
rebuilds it and continues with the same remaining batches. The GPU and CPU pipelines share `augment_view`; only the
decoder device differs, so the CPU tests cover the GPU graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from supcon_scale import distributed
from supcon_scale.config import DataConfig
from supcon_scale.data.sharding import FolderCursor
from supcon_scale.data.spec import AugmentSpec

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
    """The spec's colour/RandAugment stages on uint8 HWC crops, in order.

    Colour jitter and a grayscale stage that follows it fuse into one `color_twist`: brightness, contrast, hue and
    saturation are one linear colour transform, and grayscale is saturation 0, so the product is exact.
    """
    from nvidia.dali import fn, types

    from supcon_scale.data.dali_auto_aug import auto_augment_views, rand_augment_views

    stages = list(spec.stages)
    i = 0
    while i < len(stages):
        stage = stages[i]
        if stage == "jitter":
            b, c, s, h = spec.jitter
            jit = _coin_bool(spec.jitter_p)
            on = fn.cast(jit, dtype=types.FLOAT)
            saturation = 1.0 + on * _uniform(-s, s)
            apply = jit
            if i + 1 < len(stages) and stages[i + 1] == "grayscale":
                gray = _coin_bool(spec.grayscale_p)
                saturation = saturation * (1.0 - fn.cast(gray, dtype=types.FLOAT))
                apply = jit | gray
                i += 1
            # Only the selected samples pay for the colour op (an identity color_twist costs as much as a real one).
            if apply:
                x = fn.color_twist(
                    x,
                    brightness=1.0 + on * _uniform(-b, b),
                    contrast=1.0 + on * _uniform(-c, c),
                    saturation=saturation,
                    hue=on * _uniform(-360.0 * h, 360.0 * h),  # torchvision's hue is a fraction of the circle
                )
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
        i += 1
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


def crop_views(encoded: Any, spec: AugmentSpec, views: int, decoder: str, roi: bool, hw_decoder_load: float) -> list:
    """V random-resized-crops at `image_size`: one decode + V crops, or V ROI decodes (`roi=True`)."""
    from nvidia.dali import fn, types

    size = (spec.image_size, spec.image_size)
    hw = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    crop = dict(random_area=list(spec.crop_scale), random_aspect_ratio=list(spec.crop_ratio), num_attempts=10)
    if roi:
        return [
            fn.resize(
                fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB, **crop, **hw),
                size=size,
                antialias=True,
            )
            for _ in range(views)
        ]
    image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **hw)
    return [fn.random_resized_crop(image, size=size, antialias=True, **crop) for _ in range(views)]


def build_pipeline(
    files: list[str],
    labels: list[int],
    spec: AugmentSpec,
    *,
    views: int,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    device: str,
    device_id: int | None,
    num_threads: int,
    seed: int,
    roi: bool = ROI_DECODE_DEFAULT,
    hw_decoder_load: float = 0.75,
    checkpoint: bytes | None = None,
) -> Any:
    """The V-view training pipeline over `files` in the given order (no reader-side shuffling).

    Outputs `(view_0, ..., view_{V-1}, label)` of `batch_size` samples, or with `roi` `(views, label)` of
    V * `batch_size` samples where sample k is view k % V of image k // V (`split_views` undoes it).
    """
    dali = _dali()
    from nvidia.dali import fn

    if roi:
        files = [f for f in files for _ in range(views)]
        labels = [y for y in labels for _ in range(views)]
        batch_size, branches = batch_size * views, 1
    else:
        branches = views

    @dali.pipeline_def(enable_conditionals=True)
    def two_view():
        encoded, label = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            name=READER,
        )
        decoder = "mixed" if device == "gpu" else "cpu"
        out = [augment_view(v, spec) for v in crop_views(encoded, spec, branches, decoder, roi, hw_decoder_load)]
        return (*out, label)

    pipe = two_view(
        batch_size=batch_size,
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


class DaliLoader(FolderCursor):
    """The data contract of docs/DESIGN.md over DALI pipelines; see `supcon_scale.data.build_train_loader`."""

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
        self.roi = roi
        self.device = resolve_device(cfg.backend, ctx)
        self.backend = f"dali-{self.device}"
        super().__init__(cfg, ctx, seed, out_dir)
        self._checkpoint: bytes | None = None  # DALI state matching (epoch, position) after load_state_dict
        self._iter: Any = None

    def _reset(self) -> None:
        self._iter, self._checkpoint = None, None

    def epoch_files(self, epoch: int) -> tuple[list[str], list[int]]:
        """Every rank's samples for `epoch`, rank 0's first: DALI's contiguous shard r is then global rank r's share."""
        idx = np.concatenate([self.plan.rank_indices(self.seed, epoch, r) for r in range(self.ctx.world_size)])
        return [self.index.paths[i] for i in idx], [self.index.labels[i] for i in idx]

    def _open(self) -> Any:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        files, labels = self.epoch_files(self.epoch)
        pipe = build_pipeline(
            files,
            labels,
            self.spec,
            views=self.cfg.views,
            batch_size=self.local_batch,
            shard_id=self.ctx.rank,
            num_shards=self.ctx.world_size,
            device=self.device,
            device_id=(self.ctx.device.index or 0) if self.device == "gpu" else None,
            num_threads=self.cfg.dali_threads,
            seed=distributed.rank_seed(self.seed, self.ctx.rank, self.epoch) % 2**31,
            roi=self.roi,
            hw_decoder_load=self.cfg.hw_decoder_load,
            checkpoint=self._checkpoint,
        )
        names = [f"view{v}" for v in range(1 if self.roi else self.cfg.views)] + ["label"]
        # Shards hold whole batches under drop_last (EpochPlan trims), else the last batch is partial on every rank.
        policy = LastBatchPolicy.DROP if self.cfg.drop_last else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], names, reader_name=READER, last_batch_policy=policy, auto_reset=False)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._begin_pass()
        if self._iter is None or self.position == 0:
            self._iter = self._open()
        cuda = self.device == "gpu"
        for batch in self._iter:
            views, labels = split_views(batch[0], self.cfg.views, self.roi)
            if cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            labels = labels.to(self.ctx.device, dtype=torch.int64, non_blocking=True)
            self.position += 1
            yield [v.to(self.ctx.device, non_blocking=True) for v in views], labels
            if self.position >= self.steps_per_epoch:
                break
        assert self.position == self.steps_per_epoch, (self.position, self.steps_per_epoch)
        self._iter = None

    def state_dict(self) -> dict[str, int | str | torch.Tensor]:
        """Position plus DALI's serialized reader/RNG checkpoint as a uint8 tensor (loads with weights_only=True)."""
        state: dict[str, int | str | torch.Tensor] = {
            **self.position_state(), "dali_checkpoint": torch.zeros(0, dtype=torch.uint8)
        }
        blob = None
        if 0 < self.position < self.steps_per_epoch and self._iter is not None:
            blob = self._iter.checkpoints()[0]
        elif self.position and self._checkpoint is not None:
            blob = self._checkpoint
        if blob is not None:
            raw = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else bytes(blob)
            state["dali_checkpoint"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)
        blob = state.get("dali_checkpoint")
        self._checkpoint = bytes(blob.numpy().tobytes()) if isinstance(blob, torch.Tensor) and blob.numel() else None
        if 0 < self.position < self.steps_per_epoch and self._checkpoint is None:
            raise ValueError("data position is mid-epoch but holds no DALI checkpoint; cannot resume exactly")
