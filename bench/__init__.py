"""Benchmarks: a seeded node-volume generator, a tree comparer, and the runner that measures clawback (and later restic, Borg)."""
