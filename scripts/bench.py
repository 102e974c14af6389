"""Benchmark shmflush against its peers; the same as ``python -m shmflush bench``."""

import sys

from shmflush._tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
