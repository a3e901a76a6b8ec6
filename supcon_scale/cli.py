"""`supcon-scale <subcommand>`: each subcommand is a thin call into the library.

Run under torchrun as `torchrun ... -m supcon_scale.cli train --config CONFIG [key=value ...]`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from supcon_scale.config import RunConfig
    from supcon_scale.hooks import Hook

# Subcommands implemented elsewhere, as "module:function" taking argv and returning an exit status. Imported only
# when called, so `--help` stays fast and a missing optional extra only matters to the command that needs it.
DELEGATED = {
    "check-data": ("supcon_scale.data.badfiles:main", "scan a dataset for files that cannot be decoded"),
    "make-shards": ("supcon_scale.data.shards:main", "convert an image folder into WebDataset tar shards"),
    "linear-eval": ("supcon_scale.evaluation.linear:main", "linear evaluation of a checkpoint (frozen encoder)"),
    "knn": ("supcon_scale.evaluation.knn:main", "weighted kNN accuracy of a checkpoint"),
    "imagenet-c": ("supcon_scale.evaluation.robustness:main", "corruption robustness (mCE) of checkpoints"),
    "demo": ("supcon_scale.demo:main", "the end-to-end demo on the bundled digits (CPU)"),
    "torchrun": ("supcon_scale.resilience:torchrun_main", "torchrun that exits 3 when the job was preempted"),
    "bench-loss": ("supcon_scale.bench.loss:main", "time and memory of the loss implementations"),
    "bench-dataloader": ("supcon_scale.bench.loader:main", "images/s of the input pipelines"),
    "bench-train": ("supcon_scale.bench.train:main", "training step throughput against cross-entropy"),
}

EXIT_USAGE = 2


def _train(args: argparse.Namespace, hooks: Sequence[Hook] = ()) -> int:
    from supcon_scale import config

    cfg = config.load(args.config, args.overrides)  # before importing torch: a bad config fails in a fraction of a second
    from supcon_scale import distributed

    return distributed.record(_fit)(cfg, hooks)


def _fit(cfg: RunConfig, hooks: Sequence[Hook]) -> int:
    from supcon_scale import distributed, trainer
    from supcon_scale.resilience import EXIT_PREEMPTED, NonFiniteError, Preempted, notify_agent

    ctx = distributed.init(cfg.engine.backend, cfg.seed)
    try:
        trainer.fit(cfg, ctx, hooks=hooks)
    except Preempted as exc:
        print(f"supcon-scale: {exc}", file=sys.stderr)
        notify_agent()
        return EXIT_PREEMPTED
    except NonFiniteError as exc:
        print(f"supcon-scale: error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    return 0


def _make_demo_data(args: argparse.Namespace) -> int:
    from supcon_scale.data.folder import make_demo_data

    out = make_demo_data(args.dir, size=args.size)
    print(f"wrote the digits to {out}/train and {out}/val")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supcon-scale", description="Supervised Contrastive training at scale.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="pre-train an encoder (run under torchrun or the deepspeed launcher)")
    t.add_argument("--config", type=Path, help="YAML recipe (configs/...); `base:` inheritance allowed")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.global_batch_size=512 loss.temperature=0.1")
    t.set_defaults(func=_train)
    d = sub.add_parser("make-demo-data", help="write scikit-learn's digits as JPEGs in the ImageNet folder layout")
    d.add_argument("dir", type=Path)
    d.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    d.set_defaults(func=_make_demo_data)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


LOCAL_RANK_ARG = re.compile(r"--local[_-]rank(?:=(.*))?$")


def take_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher puts before the subcommand, keeping it as LOCAL_RANK.

    The launcher also sets LOCAL_RANK in the environment, which `distributed.init` reads; the flag only exists for
    scripts that predate that (`--no_local_rank` turns it off, but users launch without it).
    """
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        match = LOCAL_RANK_ARG.match(arg)
        if match is None:
            rest.append(arg)
            continue
        value = match.group(1) if match.group(1) is not None else next(args, "")
        if not value.isdigit():
            raise ValueError(f"--local_rank needs a non-negative integer, got {value!r}")
        os.environ.setdefault("LOCAL_RANK", value)
    return rest


def main(argv: list[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    """The CLI; `hooks` reach `train`'s run (for programs that embed the CLI, such as the fault-injection tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from supcon_scale.config import ConfigError

    try:
        argv = take_local_rank(argv)
        if argv and argv[0] in DELEGATED:
            module, func = DELEGATED[argv[0]][0].split(":")
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        args = parser().parse_args(argv)
        return args.func(args, hooks) if args.func is _train else args.func(args)
    except ConfigError as exc:
        print(f"supcon-scale: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"supcon-scale: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
