"""The tools built on shmflush: the demo, the benchmark and the soak, and the one
workload and checker they share with the tests.

Nothing here is imported by ``import shmflush``: the library a user imports is
the library.  ``python -m shmflush demo`` and ``python -m shmflush bench`` load
these modules on demand, ``scripts/soak.py`` runs the soak.
"""
