"""Benchmarks, run from the repository root as `python -m benchmarks.NAME ...`, with or without the
project installed (the GPU machine has a bare checkout). A regular package, so that `-m` finds this
folder first even where an installed distribution ships a top-level `benchmarks` of its own."""
