"""Shape buckets: how the generators and the engine round sizes so that a long run
compiles a handful of programs instead of one per length."""

from __future__ import annotations


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def prefill_width(n: int) -> int:
    """Prefill width for ``n`` new tokens: a multiple of 16 up to 128, then of 64 (the
    compute padding stays under ~6% past 1k tokens, so prefill timings stay honest)."""
    return round_up(n, 16) if n <= 128 else round_up(n, 64)


def table_width(blocks: int) -> int:
    """Block-table columns for ``blocks`` pages: a multiple of 8 up to 64, then of an
    eighth of the next power of two (16 up to 128, 32 up to 256, ...).

    Table padding costs little (the kernels stop at each row's length; the XLA path
    gathers the padding), so the step grows with the size: a chat that gains a few
    blocks a turn recompiles once per ~12% of growth, not once per 8 blocks.
    """
    if blocks <= 64:
        return round_up(blocks, 8)
    return round_up(blocks, pow2(blocks) // 8)
