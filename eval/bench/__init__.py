"""Benchmarks (figures and ratios, never timed tests): the d16 frontier, sampling, the official code."""
