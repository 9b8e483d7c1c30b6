"""Benchmarks behind `make bench`: run from a checkout, not part of the installed package."""
