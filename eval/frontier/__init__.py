"""The frontier job: `python -m eval.frontier --config configs/default.py --workdir runs/frontier`.

`job` holds the stages and `run(config, workdir)`; `distributed` splits a run over processes
(`python -m eval.frontier.launch --processes N -- <frontier flags>`).
"""
from eval.frontier.job import run  # noqa: F401  (eval.frontier.run(config, workdir))
