"""Imports every built-in compressor module so that each registers itself."""
from compress import full  # noqa: F401
from compress import quant_cache  # noqa: F401
from compress import eviction  # noqa: F401
from compress import eviction_attn  # noqa: F401
from compress import oracle  # noqa: F401
from compress import scalekv  # noqa: F401
from compress import lowrank  # noqa: F401
from compress import merging  # noqa: F401
from compress import window_sum  # noqa: F401
from compress import attn_matching  # noqa: F401
from compress import learned_lowrank  # noqa: F401
from compress import learned_evict  # noqa: F401
from compress import learned_merge  # noqa: F401
