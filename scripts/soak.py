"""Crash-safety soak: random SIGKILLs of writers and the flusher under load, then a
record-by-record check of the file.  ``--help`` lists the options."""

import sys

from shmflush._soak import main

if __name__ == "__main__":
    sys.exit(main())
