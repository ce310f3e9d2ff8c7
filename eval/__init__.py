"""Evaluation, by role (data flows var_jax -> compress -> train -> eval; nothing below imports eval):

- `engine/`   the evaluation engine: held-out caches (CacheSet), one program per method x budget
              (sweep), points in order with compile-ahead (points), trained/calibrated parameters
              (params), reference outputs computed once (exact_store), result tables and run paths
              (results), confidence intervals (stats).
- `frontier/` the frontier job (`python -m eval.frontier`): its stages (job), several processes
              (distributed, `python -m eval.frontier.launch`).
- `bounds/`   the rank bound, the Gaussian ideal-code reference, the hard instance.
- `quality/`  generated images: closed loop, image and token metrics, the built-in classifier, samples,
              paired comparison of two methods (`python -m eval.quality.compare`).
- `report/`   Pareto envelopes, plots, TensorBoard (`python -m eval.report.tb`) and its screenshot.
- `bench/`    benchmarks: the frontier at d16, sampling speed and memory, against the official code.

Packages import downwards in this order: engine <- bounds, quality, report <- frontier <- bench.
"""
