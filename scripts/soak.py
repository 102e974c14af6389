"""Reliability soak: under a live load, random SIGKILLs of writers and the flusher,
exceptions injected into appends, SIGSTOPped writers and short-lived writer
threads, at a geometry picked per run (mostly create()'s defaults); then a
record-by-record check of the file.  ``--help`` lists the options."""

import sys

from shmflush._tools.soak import main

if __name__ == "__main__":
    sys.exit(main())
