"""The argument parsers of the delegated subcommands, importing nothing heavy (issue 26 item 3, "Fast commands").

`cli.py` parses a delegated command's arguments with the parser built here before it imports the command's module
(which imports torch, timm or DALI at the top), so `--help` and every argparse refusal return in a fraction of a
second; the module's own `main(argv)` parses with the same function, so both see one definition. The descriptions
were the modules' docstrings; they are copied here because reading them would import the module. The few values
that the parsers need from heavy modules are repeated here (tests/test_arguments.py checks them against the
originals). `supcon-scale torchrun` has none: its options are torch's own parser.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROTOCOL_NAMES = ["fast", "hobbitlong", "official", "official_cifar", "official_imagenet", "paper", "sgd"]  # linear.py
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip  # evaluation/corruptions.py's 15 of the mCE
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)  # evaluation/corruptions.py
MIN_SIDE = 32  # evaluation/corruptions.py: imagecorruptions refuses smaller images


def default_workers(ranks_per_node: int = 1) -> int:
    """Decoding processes of one rank: the CPUs this process may use (not the machine's), shared by the node's ranks."""
    return max(1, min(32, len(os.sched_getaffinity(0)) // max(1, ranks_per_node)))


def json_object(text: str) -> dict[str, Any]:
    """`bench-train --model-kwargs`: a JSON object, or argparse's one-line usage error (exit 2)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text[:80]!r}")
    return value


def check_data() -> argparse.ArgumentParser:
    """`supcon-scale check-data` (data/badfiles.py)."""
    p = argparse.ArgumentParser(
        prog="supcon-scale check-data",
        description="`supcon-scale check-data DIR`: table of undecodable images; exit 1 when any is found, 2 on bad "
        "input.",
    )
    p.add_argument("dir", type=Path, help="dataset folder, scanned recursively")
    p.add_argument("--workers", type=int, default=default_workers(), help="decoding processes (default: the CPUs)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report as JSON")
    p.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="manifest to read and write (default: one in the user's cache, named for DIR, which training runs over "
        "DIR read; a run reads another one given as data.manifest)",
    )
    p.add_argument("--no-manifest", action="store_true", help="decode every file and write no manifest")
    p.add_argument(
        "--backend",
        choices=["dali", "torchvision"],
        default="dali",
        help="the loader the runs use: dali (default, the stricter) refuses formats its decoder lacks (GIF, TGA, ...)",
    )
    return p


def make_shards() -> argparse.ArgumentParser:
    """`supcon-scale make-shards` (data/shards.py)."""
    p = argparse.ArgumentParser(
        prog="supcon-scale make-shards",
        description="`supcon-scale make-shards SRC DST --shard-size N`: an image folder as WebDataset tar shards + "
        "index.json.",
    )
    p.add_argument("src", type=Path, help="image folder (SRC/train/<class>/* or SRC/<class>/*)")
    p.add_argument("dst", type=Path, help="output directory for shard-*.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    return p


def linear_eval() -> argparse.ArgumentParser:
    """`supcon-scale linear-eval` and tools/linear_eval.py (evaluation/linear.py)."""
    p = argparse.ArgumentParser(
        prog="linear_eval", description="Linear evaluation of a frozen encoder (final-epoch top-1/top-5)."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory or encoder.safetensors (encoder_ema.safetensors: the EMA weights)",
    )
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/ class folders")
    p.add_argument(
        "--protocol", "--preset", dest="preset", default="official", choices=PROTOCOL_NAMES,
        help="official (the TF stage 2, ImageNet or CIFAR form by the run), hobbitlong (main_linear.py), fast (L-BFGS)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="default: the protocol's (official: the run's batch)")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: protocol base x batch/256)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    p.add_argument("--augment", action="store_true", help="fast/sgd: train the head on crop+flip views")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="keep extracted features here and reuse them")
    p.add_argument("--save-probe", default=None, help="write the trained linear head (safetensors) for imagenet_c")
    p.add_argument("--json", default=None, help="write the results as JSON")
    return p


def finetune() -> argparse.ArgumentParser:
    """`supcon-scale finetune` (evaluation/finetune.py)."""
    p = argparse.ArgumentParser(
        prog="supcon-scale finetune",
        description="Fine-tuning transfer (the paper's section 4.4 protocol family): the whole encoder trains with a "
        "new linear head.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory or encoder.safetensors (encoder_ema.safetensors: the EMA weights)",
    )
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/ class folders")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the cosine (absolute)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's data.image_size")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the fine-tuned encoder here (a timm state dict, safetensors)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument(
        "--out-dir",
        default=None,
        help="keep the training run here (checkpoints, metrics.jsonl; run again to resume); default: a temporary "
        "folder, removed after; required under torchrun",
    )
    p.add_argument(
        "overrides", nargs="*", help="KEY=VALUE over the run's config (engine.name=fsdp, precision=bf16, ...)"
    )
    return p


def knn() -> argparse.ArgumentParser:
    """`supcon-scale knn` (evaluation/knn.py)."""
    p = argparse.ArgumentParser(prog="knn", description="Weighted kNN accuracy of a frozen encoder (train -> val).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="dataset root holding train/ and val/")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", default=None)
    return p


def imagenet_c() -> argparse.ArgumentParser:
    """`supcon-scale imagenet-c` and tools/imagenet_c.py (evaluation/robustness.py)."""
    p = argparse.ArgumentParser(
        prog="imagenet_c",
        description="ImageNet-C style robustness: generate a -C dataset and/or score checkpoints (CE, mCE, plots).",
    )
    p.add_argument(
        "--c-root", required=True, help="ROOT/<corruption>/<severity>/<class>/<image> (written by --generate-from)"
    )
    p.add_argument("--generate-from", default=None, help="a split folder (<class>/<image>) to build the -C copy from")
    p.add_argument("--checkpoint", action="append", help="NAME=PATH, repeat to compare models")
    p.add_argument("--probe", action="append", help="NAME=PATH of a head saved by linear_eval --save-probe")
    p.add_argument("--clean", default=None, help="dataset root with train/ (probe) and val/ (clean error)")
    p.add_argument(
        "--baseline", default=None,
        help="NAME of a scored checkpoint (or alexnet) to normalise CE by; default: AlexNet on ImageNet-C's 1,000 "
        "classes at all five severities, else no CE/mCE",
    )  # fmt: skip
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    p.add_argument(
        "--extra", action="store_true", help="also the 4 extra corruptions (reported, not in mCE vs AlexNet)"
    )
    p.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--work-size", type=int, default=MIN_SIDE, help="corrupt smaller images at this size (then shrink back)"
    )
    p.add_argument("--per-class", type=int, default=None, help="generate only the first N images per class")
    p.add_argument("--preset", default="fast", help="linear probe preset when no --probe is given")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/robustness")
    return p


DEMO_DOC = """\
The end-to-end demo on a CPU: digits -> SupCon on two torchrun ranks -> linear eval -> cross-entropy baseline.

Every stage is the real tool a user runs at scale: `torchrun -m supcon_scale.cli train`, the exported encoder,
`linear_eval`, and the corruption-robustness report.
"""  # demo.py's docstring


def demo() -> argparse.ArgumentParser:
    """`supcon-scale demo` (demo.py)."""
    p = argparse.ArgumentParser(prog="supcon-scale demo", description=DEMO_DOC)
    p.add_argument("--out", default="runs/demo", help="where data, runs and summary.json go")
    p.add_argument("--config", type=Path, default=Path("demo/digits"))
    p.add_argument("--ce-config", type=Path, default=Path("demo/digits_ce"))
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks (gloo on CPU)")
    p.add_argument("--genscl-config", type=Path, default=Path("demo/digits_genscl"))
    p.add_argument("--genscl", action="store_true", help="also train GenSCL with the cross-entropy model as teacher")
    p.add_argument("--skip-robustness", action="store_true")
    p.add_argument("--c-per-class", type=int, default=8, help="val images per digit in digits-C (75 versions each)")
    p.add_argument("--labels-per-class", type=int, default=5, help="train images per digit of the few-label probe")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to both runs")
    return p


CONTINUAL_DOC = """\
`supcon-scale continual`: SCR and the ER baseline on a class-incremental stream, every method x seed, then
the summary (JSON), the accuracy matrices and the per-stage accuracy (PNG).

Run under torchrun for several ranks (`torchrun ... -m supcon_scale.cli continual --config ...`); each run's
checkpoints, metrics and result live in OUT_DIR/<method>/seed_<s>/.
"""  # continual/run.py's docstring (RawDescriptionHelpFormatter keeps its lines)


def continual() -> argparse.ArgumentParser:
    """`supcon-scale continual` (continual/run.py)."""
    p = argparse.ArgumentParser(
        prog="supcon-scale continual",
        description=CONTINUAL_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", type=Path, help="a recipe (continual/digits, ...) or a YAML file; `base:` inheritance allowed"
    )
    p.add_argument("--json", type=Path, help="where the summary goes (default OUT_DIR/summary.json)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. memory.size=500 seeds=[0,1,2]")
    return p


def bench_dataloader() -> argparse.ArgumentParser:
    """`supcon-scale bench-dataloader` and tools/bench_dataloader.py (bench/loader.py)."""
    p = argparse.ArgumentParser(
        prog="bench_dataloader",
        description="Benchmark the training data loaders (images/s, views/s, CPU, memory) and write a table and JSON.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="an image folder (ROOT/train/<class>/... or ROOT/<class>/...)")
    src.add_argument("--synthetic", type=int, metavar="N", help="write N realistic 500x375 JPEGs and use them")
    p.add_argument("--synthetic-dir", type=Path, default=Path("runs/bench_data"), help="where --synthetic writes")
    p.add_argument("--backends", default="dali-cpu,torchvision", help="comma list of dali-gpu,dali-cpu,torchvision")
    p.add_argument(
        "--formats", default="folder", help="comma list of folder,shards (shards: the same images, via make-shards)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard for --formats shards")
    p.add_argument(
        "--dali-decode", default="once,roi", help="DALI views: once (1 decode + V crops), roi (V ROI decodes, 1 batch)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers")
    p.add_argument("--preset", default="jitter_randaugment", help="AugmentSpec preset (default: jitter + RandAugment)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best counts")
    p.add_argument("--profile", action="store_true", help="also time cumulative DALI CPU stages")
    p.add_argument("--json", type=Path, default=None, metavar="OUT")
    return p


BENCH_TRAIN_DOC = """\
Training-step benchmark: a SupCon step vs a cross-entropy step of the same encoder, one process.

Both time the trainer's own `train_step` with the objective `loss.name` builds, so what is measured is what a run
executes (the views' concatenation, the batch-norm copy a skipped step restores, the objective's loss). The
cross-entropy step (one view, linear classifier) is the baseline measured in the same run: SupCon's target is >= 95%
of its per-view rate. Both run on synthetic tensors; `--data DIR` adds the SupCon step fed by a real loader
(`--backend`), so the input pipeline's share of the step shows. `--max-batch` searches the largest per-GPU batch
whose SupCon step fits.
"""  # bench/train.py's docstring


def bench_train() -> argparse.ArgumentParser:
    """`supcon-scale bench-train` and tools/bench_train.py (bench/train.py)."""
    p = argparse.ArgumentParser(prog="bench_train", description=BENCH_TRAIN_DOC)
    p.add_argument("--model", default="resnet50", help="timm encoder name")
    p.add_argument(
        "--model-kwargs",
        type=json_object,
        default=None,
        help='JSON object of timm.create_model arguments (model.kwargs), e.g. \'{"patch_size": 4, "depth": 2}\'',
    )
    p.add_argument("--batch-per-gpu", type=int, default=64, help="images per step (SupCon trains V views of each)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--engine", default="ddp", choices=["ddp", "fsdp", "deepspeed"], help="one process of this engine")
    p.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage with --engine deepspeed")
    p.add_argument("--data", type=Path, help="an image folder: also time the SupCon step fed by --backend's loader")
    p.add_argument("--backend", default="dali", choices=["dali", "dali-cpu", "dali-gpu", "torchvision"])
    p.add_argument("--workers", type=int, default=4, help="DALI threads / DataLoader workers for --data")
    p.add_argument("--preset", default="simclr", help="AugmentSpec preset of the loader (--data)")
    p.add_argument(
        "--lars",
        action="store_true",
        help="also time one LARS step: timm's Lars on the tensors vs ZeroLars on ZeRO-style flat partitions",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="LIMIT",
        help="also search the largest per-GPU batch (<= LIMIT) whose SupCon step fits in device memory",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="as the run config's `device`")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def plot() -> argparse.ArgumentParser:
    """`supcon-scale plot` (evaluation/plots.py)."""
    p = argparse.ArgumentParser(prog="supcon-scale plot", description="PNG training curves from a run's metrics.jsonl")
    p.add_argument("run_dir", type=Path, help="a training run's out_dir")
    p.add_argument("--out", type=Path, default=None, help="where the PNGs go (default RUN_DIR/plots)")
    return p


def embed_plot() -> argparse.ArgumentParser:
    """`supcon-scale embed-plot` (evaluation/embedding.py)."""
    p = argparse.ArgumentParser(
        prog="supcon-scale embed-plot",
        description="A 2-D map of an encoder's validation embeddings, coloured by class: what SupCon does to the "
        "geometry.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="encoder.safetensors or encoder_ema.safetensors (or the run directory holding the first)",
    )
    p.add_argument("--data", required=True, help="dataset root holding val/<class>/*")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the checkpoint, embedding.png)")
    p.add_argument("--method", choices=["auto", "tsne", "umap"], default="auto", help="auto: UMAP when installed")
    p.add_argument("--max-images", type=int, default=2000, help="evenly spaced subset of val (t-SNE is quadratic)")
    p.add_argument("--image-size", type=int, default=None, help="default: the run's data.image_size")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


# cli.py's delegated command -> its parser. The delegated commands missing here (torchrun, doctor, bench-loss) parse
# in their own module: torchrun's options are torch's parser, and doctor.py and bench/loss.py import nothing heavy.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "check-data": check_data,
    "make-shards": make_shards,
    "linear-eval": linear_eval,
    "finetune": finetune,
    "knn": knn,
    "imagenet-c": imagenet_c,
    "demo": demo,
    "continual": continual,
    "bench-dataloader": bench_dataloader,
    "bench-train": bench_train,
    "plot": plot,
    "embed-plot": embed_plot,
}
