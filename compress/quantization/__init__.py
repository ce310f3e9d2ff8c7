"""Quantisation: packed integer codes (`codes`), `kivi` at a fixed width and `quant_auto`."""
from compress.core.registry import import_family

import_family(__name__, __path__)
