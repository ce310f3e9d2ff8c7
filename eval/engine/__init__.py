"""The evaluation engine: held-out caches, one compiled program per method x budget, result tables."""
