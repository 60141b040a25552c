"""``asag-bench`` / ``python -m asag_kernels.bench``: the benchmark CLI.

It lives in :mod:`asag_kernels.benchmarking.cli` (on the benchmark core,
:mod:`asag_kernels.benchmarking.core`); this module keeps the documented entry points.
"""

import sys

from .benchmarking.cli import main

if __name__ == "__main__":
    sys.exit(main())
