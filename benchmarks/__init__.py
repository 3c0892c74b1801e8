"""Ratio benchmarks (not tests). Run them all with `make bench` / `make bench-quick`."""
