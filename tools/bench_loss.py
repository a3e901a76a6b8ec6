"""Benchmark the SupCon loss implementations (see `supcon_scale.losses.bench`)."""

import sys

from supcon_scale.losses.bench import main

if __name__ == "__main__":
    sys.exit(main())
