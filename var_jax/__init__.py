"""A faithful flax.nnx port of VAR (next-scale prediction) and its multi-scale VQ-VAE."""
from var_jax.api import Generation, VARModel, load_converted, load_official
from var_jax.config import SIZES, VARConfig, VQVAEConfig
from var_jax.default_model import load_default

__all__ = ['Generation', 'VARModel', 'load_converted', 'load_default', 'load_official', 'SIZES', 'VARConfig', 'VQVAEConfig']
