"""Shape buckets: never below the size asked for, bounded padding, few distinct values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvjax.engine.shapes import pow2, prefill_width, round_up, table_width


@given(st.integers(0, 10**6), st.integers(1, 512))
def test_round_up(n: int, multiple: int) -> None:
    r = round_up(n, multiple)
    assert r % multiple == 0 and r >= max(n, multiple)
    assert r - n < multiple or r == multiple


@given(st.integers(0, 10**6))
def test_pow2(n: int) -> None:
    p = pow2(n)
    assert p & (p - 1) == 0 and p >= n and (p == 1 or p // 2 < n)


@given(st.integers(1, 10**5))
def test_prefill_width_pads_by_less_than_one_step(n: int) -> None:
    w = prefill_width(n)
    assert w >= n and w - n < (16 if n <= 128 else 64)


@given(st.integers(1, 10**5))
def test_table_width_pads_by_at_most_a_quarter(blocks: int) -> None:
    w = table_width(blocks)
    assert w >= blocks and w % 8 == 0
    assert w - blocks < 8 or w - blocks <= blocks // 4


def test_table_width_compiles_few_programs_for_a_growing_chat() -> None:
    # a chat growing by 10 blocks a turn from 136 to 1136 blocks: 101 sizes
    widths = {table_width(b) for b in range(136, 1137, 10)}
    assert len(widths) == 13  # multiples of 8 would give 101
    assert [table_width(b) for b in (1, 8, 9, 64, 65, 128, 129, 200, 257)] == [
        8, 8, 16, 64, 80, 128, 160, 224, 320]
