"""Augmentation fidelity benchmark: `python tools/bench_augment.py --views 2000 --json out.json`."""

import sys

from supcon_scale.bench.augment import main

if __name__ == "__main__":
    sys.exit(main())
