"""Compiles the real train step for a TPU topology from this CPU host: python -m flanjax.aot.

    python tools/aot_compile.py --gin_file=flan.gin --gin_file=models/t5_xl.gin --topology=v5e:2x4
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flanjax import aot  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  aot.command(sys.argv[1:])
