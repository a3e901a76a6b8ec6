"""`supcon-scale <subcommand>`: each subcommand is a thin call into the library.

Run under torchrun as `torchrun ... -m supcon_scale.cli train --config CONFIG [key=value ...]`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from supcon_scale import arguments

if TYPE_CHECKING:
    from supcon_scale.config import RunConfig
    from supcon_scale.hooks import Hook

# Subcommands implemented elsewhere, as "module:function" taking argv and returning an exit status. Imported only
# when called, after their arguments parse (arguments.PARSERS), so `--help` and a refused flag stay fast, and a
# missing optional extra only matters to the command that needs it.
DELEGATED = {
    "check-data": ("supcon_scale.data.badfiles:main", "scan a dataset for files that cannot be decoded"),
    "make-shards": ("supcon_scale.data.shards:main", "convert an image folder into WebDataset tar shards"),
    "linear-eval": ("supcon_scale.evaluation.linear:main", "linear evaluation of a checkpoint (frozen encoder)"),
    "finetune": ("supcon_scale.evaluation.finetune:main", "fine-tune a checkpoint's whole encoder with a new head"),
    "knn": ("supcon_scale.evaluation.knn:main", "weighted kNN accuracy of a checkpoint"),
    "imagenet-c": ("supcon_scale.evaluation.robustness:main", "corruption robustness (mCE) of checkpoints"),
    "demo": ("supcon_scale.demo:main", "the end-to-end demo on the bundled digits (CPU)"),
    "continual": ("supcon_scale.continual.run:main", "class-incremental continual learning: SCR against ER"),
    "torchrun": ("supcon_scale.resilience:torchrun_main", "torchrun that exits 3 when the job was preempted"),
    "doctor": ("supcon_scale.doctor:main", "driver, CUDA, NCCL, DALI, DeepSpeed, GPUs, CPUs: what a GPU run would hit"),
    "bench-loss": ("supcon_scale.bench.loss:main", "time and memory of the loss implementations"),
    "bench-dataloader": ("supcon_scale.bench.loader:main", "images/s of the input pipelines"),
    "bench-train": ("supcon_scale.bench.train:main", "training step throughput against cross-entropy"),
    "plot": ("supcon_scale.evaluation.plots:main", "PNG training curves and time shares from a run's metrics.jsonl"),
    "embed-plot": ("supcon_scale.evaluation.embedding:main", "2-D map (t-SNE/UMAP) of an encoder's val embeddings"),
}

EXIT_USAGE = 2


def _train(args: argparse.Namespace, hooks: Sequence[Hook] = ()) -> int:
    from supcon_scale import config

    cfg = config.load(
        args.config, args.overrides
    )  # before importing torch: a bad config fails in a fraction of a second
    from supcon_scale import checkpoint, distributed, sinks
    from supcon_scale.files import check_out_dir

    sinks.check(cfg.log)  # a missing extra, before the process group and the data
    distributed.launch_env()  # a partial or malformed launcher environment, before anything waits or is written
    check_out_dir(cfg.out_dir)
    if cfg.train.resume is None:
        checkpoint.check_fresh_start(cfg.out_dir, None)  # a refused run writes nothing, not even the data scan
    else:  # a malformed meta.json or a refused config change, before the data scan and the model
        from supcon_scale import resume

        path = resume.resolve(cfg.out_dir, cfg.train.resume, quiet=True)
        if path is not None and not checkpoint.is_complete(path):
            raise ValueError(f"train.resume: {path} is not a complete checkpoint directory (no meta.json)")
        if path is not None:
            resume.check_changes(checkpoint.read_meta(path), cfg, path)
            resume.check_folders(Path(cfg.out_dir))

    return distributed.record(_fit)(cfg, hooks)


def _fit(cfg: RunConfig, hooks: Sequence[Hook]) -> int:
    from supcon_scale import distributed, trainer
    from supcon_scale.resilience import EXIT_PREEMPTED, NonFiniteError, Preempted, notify_agent

    ctx = distributed.init(cfg.engine.backend, cfg.seed, device=cfg.device)
    from supcon_scale.console import rank_stderr

    try:
        with rank_stderr(ctx.rank):  # warnings and log records of every rank, one line each, prefixed with the rank
            trainer.fit(cfg, ctx, hooks=hooks)
    except Preempted as exc:
        print(f"supcon-scale: [rank {ctx.rank}] {exc}", file=sys.stderr)
        notify_agent(exc)
        return EXIT_PREEMPTED
    except NonFiniteError as exc:
        print(f"supcon-scale: [rank {ctx.rank}] error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from supcon_scale.files import disk_full

        full = disk_full(exc)  # a full disk (or quota) inside torch.save or safetensors: one line, exit 1
        if full is None:
            raise
        print(f"supcon-scale: [rank {ctx.rank}] error: {cfg.out_dir}: not written: {full.strerror} "
              f"({type(exc).__name__}); the checkpoints already there are intact", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        distributed.teardown()
    return 0


def _make_demo_data(args: argparse.Namespace) -> int:
    from supcon_scale.data.folder import make_demo_data

    out = make_demo_data(args.dir, size=args.size)
    print(f"wrote the digits to {out}/train and {out}/val")
    return 0


def _config_show(args: argparse.Namespace) -> int:
    """The resolved config, one key a line: value, default (when it differs) and description, from config.schema()."""
    import json

    from supcon_scale import config

    cfg = config.load(args.config, args.overrides).to_dict()
    rows = []
    for k in config.schema():
        value = cfg
        for part in k.key.split("."):
            value = value[part]
        default = list(k.default) if isinstance(k.default, tuple) else k.default
        rows.append(
            {
                "key": k.key,
                "value": value,
                "default": default,
                "type": k.type_name,
                "range": k.range_text,
                "help": k.help,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        value, default = json.dumps(r["value"]), json.dumps(r["default"])
        default = f"(default {default})" if value != default else "(default)"
        print(f"{r['key']:<{width}}  {value} {default}  # {r['help']}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    """The packaged recipes, one line each: name, model, global batch and GPUs as the recipe's own header states."""
    import json

    from supcon_scale import config, recipes

    rows = []
    for name in recipes.names():
        raw = config.read_yaml(recipes.path(name))
        if "stream" in raw:  # a `continual` recipe: its own schema (continual/config.py), read as YAML
            model = raw.get("model", {}).get("encoder", "?")
            batch = f"{raw['stream'].get('batch_size', '?')} + {raw.get('memory', {}).get('batch_size', '?')} replayed"
            device = raw.get("device", "auto")
        else:
            cfg = config.from_dict(raw)
            model, batch, device = cfg.model.encoder, str(cfg.data.global_batch_size), cfg.device
        gpus = recipes.gpus_stated(name) or (
            "not stated" if device == "cuda" else "not stated; device auto (a CPU runs it)"
        )
        rows.append({"name": name, "model": model, "global_batch": batch, "gpus": gpus})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    w = [max(len(r[k]) for r in rows) for k in ("name", "model", "global_batch")]
    for r in rows:
        print(f"{r['name']:<{w[0]}}  {r['model']:<{w[1]}}  batch {r['global_batch']:<{w[2]}}  GPUs {r['gpus']}")
    print(f"(in {recipes.ROOT}; `--config NAME` takes a name or a YAML path)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """What a checkpoint holds, from its meta.json (plain JSON: nothing is unpickled, torch is not imported)."""
    import json

    path = args.checkpoint
    if not (path / "meta.json").is_file():  # a run directory: its newest complete checkpoint
        done = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "meta.json").is_file())
        if not done:
            raise ValueError(f"{path}: neither a checkpoint (no meta.json) nor a run directory with checkpoints")
        path = done[-1]
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path / 'meta.json'}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ValueError(f"{path / 'meta.json'}: not a checkpoint's meta.json (an object with a config mapping)")
    if args.json:
        print(json.dumps({"path": str(path), **meta}, indent=1))
        return 0
    files = sorted(p for p in path.iterdir() if p.is_file())
    convention = meta.get("loss_convention", meta.get("loss"))
    for name, value in [
        ("checkpoint", path),
        ("step", meta.get("step")),
        ("epoch", meta.get("epoch")),
        ("world size", meta.get("world_size")),
        ("engine", meta.get("engine")),
        ("loss convention", json.dumps(convention)),
        ("files", ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in files)),
    ]:
        print(f"{name:<16} {value}")
    print("config:")

    def flat(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            flat(v, f"{prefix}{k}.") if isinstance(v, dict) else print(f"  {prefix}{k} = {json.dumps(v)}")

    flat(meta.get("config", {}))
    return 0


def parser() -> argparse.ArgumentParser:
    from supcon_scale import __version__

    p = argparse.ArgumentParser(prog="supcon-scale", description="Supervised Contrastive training at scale.")
    p.add_argument("--version", action="version", version=f"supcon-scale {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="pre-train an encoder (run under torchrun or the deepspeed launcher)")
    t.add_argument(
        "--config", type=Path, help="a recipe's name (supcon-scale recipes) or a YAML file; `base:` inheritance allowed"
    )
    t.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. data.global_batch_size=512 loss.temperature=0.1"
    )
    t.set_defaults(func=_train)
    d = sub.add_parser("make-demo-data", help="write scikit-learn's digits as JPEGs in the ImageNet folder layout")
    d.add_argument("dir", type=Path)
    d.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    d.set_defaults(func=_make_demo_data)
    c = sub.add_parser("config", help="show the resolved config: every key, its default and what it does")
    show = c.add_subparsers(dest="action", required=True, metavar="ACTION").add_parser(
        "show", help="the resolved config (the recipe and overrides over the defaults), one key a line"
    )
    show.add_argument("--config", type=Path, help="a recipe's name or a YAML file; without it, the defaults")
    show.add_argument("overrides", nargs="*", help="dotted overrides, as for train")
    show.add_argument("--json", action="store_true", help="a JSON list of {key, value, default, type, range, help}")
    show.set_defaults(func=_config_show)
    r = sub.add_parser("recipes", help="the packaged recipes: name, model, global batch, GPUs needed")
    r.add_argument("--json", action="store_true", help="a JSON list of {name, model, global_batch, gpus}")
    r.set_defaults(func=_recipes)
    i = sub.add_parser("inspect", help="step, epoch, world size, engine, loss convention and config of a checkpoint")
    i.add_argument("checkpoint", type=Path, help="a checkpoint directory, or a run directory (its newest checkpoint)")
    i.add_argument("--json", action="store_true", help="meta.json as it is")
    i.set_defaults(func=_inspect)
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
            if argv[0] in arguments.PARSERS:  # `--help` and argparse's refusals exit here, before torch is imported
                arguments.PARSERS[argv[0]]().parse_args(argv[1:])
            module, func = DELEGATED[argv[0]][0].split(":")
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        args = parser().parse_args(argv)
        return args.func(args, hooks) if args.func is _train else args.func(args)
    except ConfigError as exc:
        print(f"supcon-scale: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError, ImportError) as exc:  # OSError: a path the user named cannot be read or written
        print(f"supcon-scale: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from supcon_scale.files import disk_full

        full = disk_full(exc)  # a full disk inside a library's writer (torch.save, safetensors): one line, exit 1
        if full is None:
            raise
        print(f"supcon-scale: error: not written: {full.strerror} ({type(exc).__name__})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
