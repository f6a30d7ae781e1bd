"""Pallas paged decode kernel (interpret mode) against the jnp and NumPy references."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_decode_cases import (
    BAD_ARGUMENTS,
    CASES,
    F32,
    TOL,
    check_against_references,
    good_arguments,
    make_inputs,
    numpy_reference,
)

from pallas_kernels.paged_decode import (
    _paged_decode,
    paged_decode_attention,
    paged_decode_attention_reference,
)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kernel_matches_references(case: tuple[Any, ...]) -> None:
    *shape, dtype, num_splits, pages_per_block, lengths = case
    args = make_inputs(len(lengths) * 1000 + sum(lengths), *shape, dtype, lengths)
    out = paged_decode_attention(*args, pages_per_block=pages_per_block,
                                 num_splits=num_splits, interpret=True)
    check_against_references(args, out, TOL[dtype])


def test_missing_pages_inside_length_and_default_block() -> None:
    args = make_inputs(7, 2, 2, 2, 64, 8, 4, F32, [30, 27], holes=True)
    out = paged_decode_attention(*args, num_splits=2, interpret=True)
    check_against_references(args, out, 1e-5)


def test_traced_lengths_under_outer_jit() -> None:
    args = make_inputs(11, 2, 1, 4, 64, 16, 3, F32, [33, 1])
    run = jax.jit(lambda *a: paged_decode_attention(*a, pages_per_block=2, num_splits=2,
                                                     interpret=True))
    check_against_references(args, run(*args), 1e-5)


def test_group_padded_to_gpu_tile_rows() -> None:
    """The zero-padded query rows used off-interpreter (>= 16) don't change the result."""
    args = make_inputs(13, 2, 2, 3, 64, 8, 3, F32, [21, 6])
    out = _paged_decode(*args, pages_per_block=2, num_splits=2, group_rows=16, num_warps=4,
                        layer=None,
                        num_stages=2, interpret=True)
    check_against_references(args, out, 1e-5)


@pytest.mark.parametrize(("mutate", "message"), [b[1:] for b in BAD_ARGUMENTS],
                         ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_arguments_raise(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    kwargs = good_arguments()
    mutate(kwargs)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**kwargs, interpret=True)


def test_layer_of_stacked_pool_read_in_place() -> None:
    """``layer=l`` on a stacked [L, P, S, K, D] pool equals the kernel on pool[l]."""
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    pools = jnp.asarray(rng.standard_normal((2, 3, 5, 8, 2, 64)), jnp.float32)  # k/v, L=3
    tables = jnp.asarray(rng.permutation(5)[:4].reshape(2, 2), jnp.int32)
    lengths = jnp.asarray([9, 16], jnp.int32)
    for layer in range(3):
        stacked = paged_decode_attention(q, pools[0], pools[1], tables, lengths, layer=layer,
                                         interpret=True)
        single = paged_decode_attention(q, pools[0, layer], pools[1, layer], tables, lengths,
                                        interpret=True)
        np.testing.assert_allclose(np.asarray(stacked), np.asarray(single), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="layer must be an int in"):
        paged_decode_attention(q, pools[0], pools[1], tables, lengths, layer=3, interpret=True)
    with pytest.raises(ValueError, match="rank 5"):
        paged_decode_attention(q, pools[0, 0], pools[1, 0], tables, lengths, layer=0,
                               interpret=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_kernel_is_as_accurate_as_the_xla_reference(seed: int) -> None:
    """In bf16 the kernel's error against float64 attention (of the same bf16 inputs) is
    no worse than the XLA reference's: only the rounding order differs (float32 scores,
    softmax and accumulation in both), so greedy paths that part in bf16 part on ties."""
    args = make_inputs(seed, 4, 2, 4, 64, 16, 16, jnp.bfloat16, [255, 200, 17, 130])
    truth = numpy_reference(*args)

    def rel_err(out: jax.Array) -> float:
        return float(np.linalg.norm(np.asarray(out, np.float64) - truth) / np.linalg.norm(truth))

    kernel = rel_err(paged_decode_attention(*args, interpret=True))
    xla = rel_err(paged_decode_attention_reference(*args))
    assert kernel <= 1.25 * xla + 1e-4, (kernel, xla)
    assert kernel < 4e-3  # a few bf16 ulps of the output (0.0078 relative spacing)


@pytest.mark.parametrize("form", ["reduce", "unrolled"])
@pytest.mark.parametrize(("seed", "n"), [(0, 5), (1, 1), (2, 8), (3, 11)])
def test_combine_splits_equals_float64_softmax_merge(seed: int, n: int, form: str) -> None:
    """The combine against float64 NumPy, in both forms (11 splits: past the unrolled
    form's limit): splits with scores far apart, empty splits (m = MASKED, den = 0) and
    a row whose splits are all empty (zeros out)."""
    from pallas_kernels.paged_decode import MASKED, combine_splits

    rng = np.random.default_rng(seed)
    b, k, r, d, group = 3, 2, 16, 64, 3
    m = rng.normal(0, 20, (b, k, n, r))
    den = rng.uniform(0.5, 4, (b, k, n, r))
    o = rng.normal(0, 1, (b, k, n, r, d)) * den[..., None]
    empty = rng.random((b, k, n, r)) < 0.3
    empty[0, 1] = True  # every split of sequence 0's second KV head
    m, den = np.where(empty, MASKED, m), np.where(empty, 0.0, den)
    o = np.where(empty[..., None], 0.0, o)
    got = combine_splits(jnp.asarray(o, jnp.float32), jnp.asarray(m, jnp.float32),
                         jnp.asarray(den, jnp.float32), group, jnp.float32, form=form)
    w = np.exp(m - m.max(axis=2, keepdims=True)) * ~empty
    total, denom = (w[..., None] * o).sum(axis=2), (w * den).sum(axis=2)
    want = total / np.where(denom > 0, denom, 1.0)[..., None]
    want = want[:, :, :group].reshape(b, k * group, d)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    assert not np.asarray(got)[0, group:2 * group].any()


def test_combine_form_checked() -> None:
    from pallas_kernels.paged_decode import combine_splits

    o, m = jnp.ones((1, 1, 2, 16, 64)), jnp.zeros((1, 1, 2, 16))
    with pytest.raises(ValueError, match="form must be one of"):
        combine_splits(o, m, m, 1, jnp.float32, form="fast")
