#!/usr/bin/env python
"""ImageNet-C robustness: `python tools/imagenet_c.py --c-root DIR [--generate-from SPLIT] --checkpoint NAME=PATH`."""

import sys

from supcon_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["imagenet-c", *sys.argv[1:]]))  # through the CLI: --help without torch
