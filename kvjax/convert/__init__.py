"""Weight conversions that shrink the KV cache of a trained model.

* :mod:`kvjax.convert.heads` — MHA/GQA -> GQA/MQA by mean-pooling K/V heads.
* :mod:`kvjax.convert.mla` — MHA/GQA -> MLA by low-rank factorisation (SVD).
"""

from kvjax.convert.heads import mean_pool_kv_heads
from kvjax.convert.mla import MLAConversion, low_rank_factors, to_mla

__all__ = ["MLAConversion", "low_rank_factors", "mean_pool_kv_heads", "to_mla"]
