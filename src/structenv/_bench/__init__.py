"""Benchmarks run by ``structenv bench ...`` (results land in ``benchmarks/results/``)."""
