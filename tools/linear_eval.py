#!/usr/bin/env python
"""Linear evaluation of a frozen encoder: `python tools/linear_eval.py --checkpoint PATH --data DIR [--json OUT]`."""

import sys

from supcon_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["linear-eval", *sys.argv[1:]]))  # through the CLI: --help without torch
