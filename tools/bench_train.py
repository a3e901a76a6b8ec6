"""SupCon vs cross-entropy training-step throughput and peak memory (see supcon_scale/engines/bench.py)."""

import sys

from supcon_scale.engines.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
