"""Data-loader throughput benchmark: `python tools/bench_dataloader.py --synthetic 300 --json out.json`."""

import sys

from supcon_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-dataloader", *sys.argv[1:]]))  # through the CLI: --help without torch
