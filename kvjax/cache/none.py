"""No cache: every step recomputes attention over the whole sequence it is given.

The baseline that cached generation must match token for token.
"""

from __future__ import annotations

import dataclasses

import jax

from kvjax.attention import attend_by_position


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoCache:
    """An empty pytree: keys and values (or MLA latent rows) are those of the current
    call only."""

    def update_and_attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                          positions: jax.Array) -> tuple[jax.Array, NoCache]:
        """Attend over the call's own tokens. q [B,T,H,D], k/v [B,T,K,D], positions [B,T]."""
        del layer
        return attend_by_position(q, k, v, positions, positions), self

    def update_and_read(self, layer: int, ckv: jax.Array, positions: jax.Array
                        ) -> tuple[jax.Array, jax.Array, NoCache]:
        """MLA latent rows of the call's own tokens. ckv [B,T,W], positions [B,T]."""
        del layer
        return ckv, positions, self

    def advance(self, positions: jax.Array) -> NoCache:
        """Nothing to track."""
        del positions
        return self
