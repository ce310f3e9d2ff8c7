"""Attention matching: compact keys, biases and values fitted to the current scale's queries."""
from compress.core.registry import import_family

import_family(__name__, __path__)
