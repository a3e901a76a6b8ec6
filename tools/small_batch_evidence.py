#!/usr/bin/env python
"""SupCon on a small budget, the evidence of issue 27 (supcon_scale/bench/small_batch.py):
`python tools/small_batch_evidence.py --out DIR [--epochs N] [--seeds 0,1,2] [--arms plain,queue,...]`."""

import sys

from supcon_scale.bench.small_batch import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
