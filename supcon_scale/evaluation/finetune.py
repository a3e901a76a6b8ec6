"""Fine-tuning transfer (the paper's section 4.4 protocol family): the whole encoder trains with a new linear head.

Fine-tuning is a training run. `finetune_config` turns the command's flags into a RunConfig that starts the encoder
from the export (`model.init_from`) under the classifier objective (`loss.name=cross_entropy`: models.py's linear
head on the pooled features), and `trainer.fit` runs it on the run's engine (ddp, fsdp or deepspeed, under torchrun
too) with its checkpoints, so a run kept in `--out-dir` resumes where it stopped (`train.resume=auto`).

Unlike linear evaluation nothing is frozen: batch norm updates its statistics and every encoder weight gets the
gradient of the new head's cross-entropy. The recipe is momentum SGD (Nesterov by default) with a cosine decay from
the absolute `--lr`, on one crop 0.08-1 + flip view per image, as the transfer protocol the paper follows (Kornblith
et al. 2019) trains; that protocol grid-searches LR and weight decay per dataset, so both are flags here and no value
is claimed to be the paper's. The accuracy reported is the final step's model's on the evaluation split, with its n
and 95% interval.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.nn as nn

from supcon_scale import arguments, config, distributed
from supcon_scale.distributed import Context
from supcon_scale.files import check_target, write_text
from supcon_scale.hooks import Hook

# The fixed part of a fine-tuning run; the flags fill in the rest (`finetune_config`), KEY=VALUE overrides win.
RECIPE: dict[str, Any] = {
    "data": {
        "format": "folder",
        "backend": "torchvision",
        "views": 1,  # one view per image: the classifier sees each image once per epoch
        "augment": {"preset": "none", "crop_scale": [0.08, 1.0], "flip_p": 0.5},  # crop + flip, no colour
    },
    "loss": {"name": "cross_entropy", "label_smoothing": 0.0},
    "optim": {"name": "sgd", "momentum": 0.9, "scale_lr": False, "schedule": "cosine", "final_lr_fraction": 0.0},
    "train": {"warmup_epochs": 0.0, "resume": "auto"},
}


def finetune_config(
    checkpoint: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    image_size: int,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    device: str | None = None,
    workers: int = 0,
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> config.RunConfig:
    """The training run of a fine-tune: `RECIPE`, the export as `model.init_from`, the flags, then `overrides`.

    The pre-training run's config beside the export (if any) gives the normalisation, the evaluation crop and
    whether the head sees L2-normalised features (`model.normalize_encoder_output`)."""
    from supcon_scale.data.folder import index_folder
    from supcon_scale.evaluation.linear import run_config
    from supcon_scale.export import encoder_file

    file, meta = encoder_file(checkpoint)
    stage1 = run_config(checkpoint)
    data = stage1.data if stage1 is not None else config.DataConfig()
    num_train = len(index_folder(Path(data_root) / "train"))
    raw = copy.deepcopy(RECIPE)
    raw.update(out_dir=str(out_dir), seed=seed, device=_device_key(device))
    raw["data"].update(
        root=str(Path(data_root).absolute()), global_batch_size=batch_size, image_size=image_size, workers=workers,
        drop_last=num_train > batch_size, eval_crop=data.eval_crop,
    )  # fmt: skip
    raw["data"]["augment"].update(mean=list(data.augment.mean), std=list(data.augment.std))
    raw["model"] = {
        "encoder": meta["encoder"],
        "cifar_stem": meta.get("cifar_stem") == "1",
        "kwargs": json.loads(meta.get("kwargs", "{}")),
        "init_from": str(file.absolute()),
        "normalize_encoder_output": stage1 is not None and stage1.model.normalize_encoder_output,
    }
    raw["optim"].update(base_lr=lr, weight_decay=weight_decay, nesterov=nesterov)
    raw["train"].update(epochs=epochs)
    return config.from_dict(config.apply_overrides(raw, list(overrides)))


def _device_key(device: str | None) -> str:
    """`--device` as the config's `device` (auto, cuda, cpu); under torchrun each rank takes its local GPU."""
    if device is None:
        return "auto"
    if device in ("cpu", "cuda"):
        return device
    raise ValueError(f"--device: {device}: choose the GPU with CUDA_VISIBLE_DEVICES and pass --device cuda")


def run(cfg: config.RunConfig, ctx: Context, hooks: Sequence[Hook] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """`trainer.fit` on `cfg` (a fine-tune resumes from its out_dir), then the final model on the evaluation split."""
    from supcon_scale import trainer
    from supcon_scale.data.folder import index_folder

    fitted = trainer.fit(cfg, ctx, hooks)
    model, scores = evaluate(cfg, ctx)
    result = {
        **scores,
        "protocol": "finetune",
        "epochs": cfg.train.epochs,
        "steps": fitted.step,
        "batch_size": cfg.data.global_batch_size,
        "lr": cfg.optim.base_lr,
        "weight_decay": cfg.optim.weight_decay,
        "nesterov": cfg.optim.nesterov,
        "final_train_loss": fitted.loss,  # the last step's, the mean over ranks
        "num_train": len(index_folder(Path(cfg.data.root) / "train")),
        "image_size": cfg.data.image_size,
        "eval_crop": cfg.data.eval_crop,
        "engine": cfg.engine.name,
        "world_size": ctx.world_size,
        "train_s": fitted.seconds,
    }
    return model, result


def evaluate(cfg: config.RunConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """The newest checkpoint's model (encoder and head) on `data.root/val`: top-1 and top-5 with n and the 95%
    interval of top-1. Every rank encodes its share of the images (`extract_features`)."""
    from supcon_scale import checkpoint, models, weights
    from supcon_scale.data.eval import EvalDataset
    from supcon_scale.data.folder import index_folder
    from supcon_scale.evaluation.features import extract_features
    from supcon_scale.evaluation.linear import topk_accuracy
    from supcon_scale.evaluation.stats import accuracy_interval

    newest = checkpoint.latest(cfg.out_dir)
    assert newest is not None, "trainer.fit saves at its last step"
    val_index = index_folder(Path(cfg.data.root) / "val")
    plain = replace(cfg.model, init_from=None, sync_bn=False, activation_checkpointing=False)  # the weights: saved
    model = models.build(plain, len(val_index.classes), cfg.data.image_size)
    weights.load_matching(model, weights.load_tensors(newest / "model.safetensors"), str(newest))
    aug = cfg.data.augment
    val = EvalDataset(
        cfg.data.root, "val", cfg.data.image_size, index=val_index, mean=aug.mean, std=aug.std, crop=cfg.data.eval_crop
    )
    logits, labels, _ = extract_features(model, val, batch_size=256, device=ctx.device, num_workers=cfg.data.workers)
    acc = topk_accuracy(logits, labels)
    n = len(val_index)
    return model, {
        **acc,
        "interval_95": accuracy_interval(acc["top1"], n),
        "num_val": n,
        "num_classes": len(val_index.classes),
    }


def _checked(args: argparse.Namespace) -> tuple[int, dict[str, str]]:
    """The flags, the splits, the output paths and the export, before anything trains: (image size, export metadata)."""
    from supcon_scale.evaluation.features import check_args
    from supcon_scale.evaluation.linear import checkpoint_image_size
    from supcon_scale.evaluation.splits import check_splits
    from supcon_scale.export import encoder_from_export

    check_args(args)
    check_splits(Path(args.data), "--data")  # both there, the same class folders: else every label after one shifts
    for path in (args.json, args.save):
        if path is not None:
            check_target(path)  # a device or a directory there: refused before the training, not after
    if distributed.launch_env().world_size > 1 and args.out_dir is None:
        raise ValueError("--out-dir: required under torchrun (every rank writes its part of the same run)")
    _, meta = encoder_from_export(args.checkpoint)  # a missing, foreign or diverged export: one line, now
    return args.image_size or checkpoint_image_size(args.checkpoint, meta.get("cifar_stem") == "1"), meta


def main(argv: list[str] | None = None) -> int:
    """`supcon-scale finetune`: exit 0; 2 with a one-line reason on bad input; 3 when preempted (resume with the
    same --out-dir); 1 when the run diverged."""
    from supcon_scale.resilience import EXIT_PREEMPTED, NonFiniteError, Preempted

    args = arguments.finetune().parse_args(argv)
    keep = contextlib.nullcontext(args.out_dir) if args.out_dir else tempfile.TemporaryDirectory(prefix="finetune-")
    with keep as out_dir:
        try:
            size, meta = _checked(args)
            cfg = finetune_config(
                args.checkpoint, args.data, out_dir, image_size=size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, weight_decay=args.weight_decay, nesterov=not args.no_nesterov, device=args.device,
                workers=args.workers, seed=args.seed, overrides=args.overrides,
            )  # fmt: skip
            ctx = distributed.init(cfg.engine.backend, cfg.seed, device=cfg.device)
        except ValueError as exc:
            print(f"finetune: error: {exc}", file=sys.stderr)
            return 2
        try:
            model, result = run(cfg, ctx)
        except ValueError as exc:  # a refusal of the trainer's (a used out_dir, a config change on resume, ...)
            print(f"finetune: [rank {ctx.rank}] error: {exc}", file=sys.stderr)
            return 2
        except Preempted as exc:
            print(f"finetune: [rank {ctx.rank}] {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        except NonFiniteError as exc:
            print(f"finetune: [rank {ctx.rank}] error: {exc}", file=sys.stderr)
            return 1
        finally:
            distributed.teardown()
        if ctx.is_main:
            _report(args, meta, model, {**result, "checkpoint": str(args.checkpoint), "encoder": meta.get("encoder")})
    return 0


def _report(args: argparse.Namespace, meta: dict[str, str], model: nn.Module, result: dict[str, Any]) -> None:
    """The printed line, `--save` (the fine-tuned encoder with the export's construction arguments) and `--json`."""
    from supcon_scale.evaluation.stats import format_accuracy
    from supcon_scale.export import export_encoder

    print(f"fine-tuned {result['encoder']}: top-1 {format_accuracy(result['top1'], result['num_val'])}, "
          f"top-5 {100 * result['top5']:.2f} after {args.epochs} epochs")  # fmt: skip
    if args.save:
        export_encoder(model.encoder, args.save, meta)  # the same construction arguments
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps({**result, "out_dir": args.out_dir}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
