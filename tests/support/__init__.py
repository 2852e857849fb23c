"""Helpers shared by the tests, the scripts and the benchmarks (never collected as tests)."""
