"""SupCon vs cross-entropy training-step throughput and peak memory (see supcon_scale/bench/train.py)."""

import sys

from supcon_scale.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
