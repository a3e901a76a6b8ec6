"""Data-loader throughput benchmark: `python tools/bench_dataloader.py --synthetic 300 --json out.json`."""

import sys

from supcon_scale.bench.loader import main

if __name__ == "__main__":
    sys.exit(main())
