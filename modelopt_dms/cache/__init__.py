"""The compact DMS KV cache: batched over rows and KV heads, blocked or paged storage.

``DMSCache`` is the transformers ``Cache``; each DMS layer is a ``DMSCacheLayer`` (slot bookkeeping in
``book.py``, storage in ``storage.py``, attention in ``kernels.py``); ``GraphDecoder`` replays decode
steps from CUDA graphs (``graphs.py``).
"""

from .dms_cache import DMSCache, DMSLayerAdapter, cache_stats
from .graphs import GraphDecoder
from .layer import DMSCacheLayer

__all__ = ["DMSCache", "DMSCacheLayer", "DMSLayerAdapter", "GraphDecoder", "cache_stats"]
