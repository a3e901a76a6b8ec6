"""Start-up benchmark: `python tools/bench_startup.py --sizes 10000,100000 --ranks 1,2 --json out.json`."""

import sys

from supcon_scale.bench.startup import main

if __name__ == "__main__":
    sys.exit(main())
