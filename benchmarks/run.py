"""The optimizer-step benchmark (what ``make bench`` and ``steadygrad bench`` run).

    python benchmarks/run.py                 # default suite: 1M, 10M x big, transformer
    python benchmarks/run.py --quick         # under a minute
    python benchmarks/run.py --full --json results.json
    python benchmarks/run.py --help

The harness is ``steadygrad.apps.bench``; see docs/benchmarks.md for the columns and the bytes model.
"""

import sys

from steadygrad.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
