"""Reports of a run: Pareto envelopes, the frontier figure, TensorBoard and its screenshot."""
