"""Benchmark the SupCon loss implementations (see `supcon_scale.bench.loss`)."""

import sys

from supcon_scale.bench.loss import main

if __name__ == "__main__":
    sys.exit(main())
