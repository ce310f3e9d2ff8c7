"""Image quality: closed-loop generation, metrics, the built-in classifier, samples, paired comparison."""
