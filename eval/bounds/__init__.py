"""Lower bounds and references drawn on the frontier: rank bound, Gaussian ideal code, hard instance."""
