import os
import sys
from pathlib import Path

# Multi-process tests import helpers from this folder in spawned ranks.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
