"""Device-side KV cache layouts, behind one contract per attention kind (see
``base.KVCache`` and, for MLA, ``base.LatentKVCache``)."""

from kvjax.cache.base import KVCache, LatentKVCache
from kvjax.cache.concat import ConcatCache
from kvjax.cache.dense import DenseCache
from kvjax.cache.latent import LatentCache
from kvjax.cache.none import NoCache
from kvjax.cache.paged import PagedCache, copy_pages, paged_attention_reference, with_block_tables
from kvjax.cache.paged_latent import PagedLatentCache

__all__ = ["ConcatCache", "DenseCache", "KVCache", "LatentCache", "LatentKVCache", "NoCache",
           "PagedCache", "PagedLatentCache", "copy_pages", "paged_attention_reference",
           "with_block_tables"]
