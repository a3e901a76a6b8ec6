#!/usr/bin/env python
"""ImageNet-C robustness: `python tools/imagenet_c.py --c-root DIR [--generate-from SPLIT] --checkpoint NAME=PATH`."""

import sys

from supcon_scale.evaluation.robustness import main

if __name__ == "__main__":
    sys.exit(main())
