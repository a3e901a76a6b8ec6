"""SupCon vs cross-entropy training-step throughput and peak memory (see supcon_scale/bench/train.py)."""

import sys

from supcon_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-train", *sys.argv[1:]]))  # through the CLI: --help without torch
