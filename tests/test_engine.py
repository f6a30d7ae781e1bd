"""Continuous-batching engine (kvjax.engine.engine).

Every greedy output is compared with ``generate([prompt], cache="dense")`` run alone.
Shapes are kept few (block size 4, chunk 8, batch 4; prompts <= 32 tokens and
max_new_tokens <= 32 so the references compile twice) because compiles dominate.
Pools are checked for leaks after every run: no sequence left, and with prefix caching
every used block is a cached one, which evicting the cache returns to the pool.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvjax.engine.engine import Engine, Request, step_fn
from kvjax.engine.generate import generate, sample_keys
from kvjax.engine.sampling import SamplingParams
from kvjax.models import LoadedModel

BS = 4
CHUNK = 8
BATCH = 4


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n).tolist() for n in (5, 20, 11, 3, 27, 9, 14)]


NEW = [12, 7, 20, 9, 5, 16, 10]


@pytest.fixture(scope="module")
def cases(llama: LoadedModel) -> list[tuple[list[int], int, list[int]]]:
    """(prompt, max_new_tokens, dense reference output) per request."""
    out = []
    for p, n in zip(_prompts(llama.config.vocab_size), NEW, strict=True):
        ref = generate(llama.model, llama.params, [p], max_new_tokens=n, cache="dense")
        out.append((p, n, ref.tokens[0]))
    return out


def _engine(lm: LoadedModel, num_blocks: int, **kwargs: Any) -> Engine:
    return Engine(lm.model, lm.params, num_blocks=num_blocks, block_size=BS, max_batch=BATCH,
                  prefill_chunk=CHUNK, **kwargs)


def _check_pool(engine: Engine) -> None:
    if engine.prefix_cache is not None:
        engine.prefix_cache.check_invariants()
    engine.allocator.check_invariants()


def _assert_pool_empty(engine: Engine) -> None:
    _check_pool(engine)
    assert not engine.has_unfinished() and engine.num_running == engine.num_waiting == 0
    stats = engine.pool_stats()
    assert stats.num_sequences == 0
    if engine.prefix_cache is not None:  # only cached blocks, all evictable
        assert stats.used_blocks == engine.prefix_cache.tree.total_blocks == stats.held_blocks
        assert engine.prefix_cache.tree.locked_blocks == 0
        engine.prefix_cache.evict(engine.num_blocks)
        stats = engine.pool_stats()
    assert stats.used_blocks == 0 and stats.free_blocks == engine.num_blocks


def _run_staggered(engine: Engine, cases: list[tuple[list[int], int, list[int]]],
                   stop: dict[int, int]) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Add two requests, then one more after every other step; stream to the end.

    Returns (case index -> request id, request id -> streamed tokens)."""
    rids: dict[int, int] = {}
    streamed: dict[int, list[int]] = {}
    pending = list(range(len(cases)))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and (len(rids) < 2 or steps % 2 == 0):
            i = pending.pop(0)
            p, n, _ = cases[i]
            rids[i] = engine.add_request(p, max_new_tokens=n,
                                         stop_token_ids=[stop[i]] if i in stop else ())
        for rid, tok in engine.step():
            streamed.setdefault(rid, []).append(tok)
        _check_pool(engine)
        steps += 1
    return rids, streamed


def test_staggered_arrivals_match_dense(llama: LoadedModel,
                                        cases: list[tuple[list[int], int, list[int]]]) -> None:
    engine = _engine(llama, num_blocks=96)
    assert engine.precompile(max_tokens=32) == 4
    compiled = step_fn._cache_size()
    # Case 2 stops at the first occurrence of its 5th reference token.
    stop_tok = cases[2][2][4]
    stop = {2: stop_tok}
    rids, streamed = _run_staggered(engine, cases, stop)
    assert step_fn._cache_size() == compiled  # precompiled: nothing new
    for i, (_, _, ref) in enumerate(cases):
        out = engine.finished[rids[i]]
        want = ref[: ref.index(stop_tok) + 1] if i in stop else ref
        assert out.tokens[0] == want, i
        assert streamed.get(rids[i], []) == want
        assert out.finish_reasons[0] == ("stop" if i in stop else "length")
    steps = engine.step_metrics
    assert max(s.rows for s in steps) == BATCH  # the batch really filled up
    assert any(s.prefill_tokens and s.decode_tokens for s in steps)  # mixed steps
    assert engine.metrics().preemptions == 0
    _assert_pool_empty(engine)
    shapes = {shape for s in steps for shape in s.shapes}
    # Decode [4, 1] and chunks [1|2|4, 8], one table width (every request fits 8 blocks).
    assert set(engine.step_shapes(32)) == {
        (BATCH, 1, 8), (1, CHUNK, 8), (2, CHUNK, 8), (4, CHUNK, 8)}
    assert (BATCH, 1, 8) in shapes and len(shapes) >= 3
    assert shapes <= set(engine.step_shapes(32))
    assert len(steps) > 4 * len(shapes)


def test_preemption_recompute_matches_dense(llama: LoadedModel,
                                            cases: list[tuple[list[int], int, list[int]]]
                                            ) -> None:
    # 12 blocks = 48 slots: the biggest request (27 + 5) fits alone, four at once do not.
    engine = _engine(llama, num_blocks=12)
    rids, streamed = _run_staggered(engine, cases, {})
    m = engine.metrics()
    assert m.preemptions > 0
    assert sum(r.preemptions for r in engine.request_metrics.values()) == m.preemptions
    for i, (_, n, ref) in enumerate(cases):
        assert engine.finished[rids[i]].tokens[0] == ref, i
        assert streamed[rids[i]] == ref
        rm = engine.request_metrics[rids[i]]
        assert rm.output_tokens == n and rm.ttft_s is not None and rm.ttft_s > 0
        assert len(rm.itl_s) == n - 1 and rm.itl_p99_s >= rm.itl_p50_s >= 0
    assert m.generated_tokens == sum(NEW) and m.tokens_per_s > 0
    assert 0 < m.mean_occupancy <= 1
    _assert_pool_empty(engine)
    # A handful of step shapes (programs) for the whole run, preemptions included; counted
    # on this engine's steps, not the process-wide jit cache other tests also fill.
    shapes = {shape for s in engine.step_metrics for shape in s.shapes}
    assert len(shapes) <= 8 and len(engine.step_metrics) > 2 * len(shapes)


def test_cancel_and_preempt_leave_no_leaks(llama: LoadedModel,
                                           cases: list[tuple[list[int], int, list[int]]]
                                           ) -> None:
    engine = _engine(llama, num_blocks=12)
    rids = [engine.add_request(p, max_new_tokens=n) for p, n, _ in cases]
    for _ in range(6):
        engine.step()
    assert engine.num_running > 0 and engine.num_waiting > 0
    running = engine._running[0].rid
    waiting = engine._waiting[-1].rid
    assert engine.cancel(running) and engine.cancel(waiting)
    assert not engine.cancel(running)  # already gone
    engine.allocator.check_invariants()
    for _ in range(3):
        engine.step()
    # Cancel whatever runs now (possibly a preempted and re-admitted request).
    assert engine.cancel(engine._running[-1].rid)
    for _ in engine.stream():
        pass
    _assert_pool_empty(engine)
    assert engine.metrics().preemptions > 0
    reasons = {rid: engine.finished[rid].finish_reasons[0] for rid in rids}
    assert sorted(reasons.values()).count("cancelled") == 3
    for i, rid in enumerate(rids):  # the others still finished exactly
        if reasons[rid] != "cancelled":
            assert engine.finished[rid].tokens[0] == cases[i][2]


def test_bad_requests_rejected(llama: LoadedModel,
                               cases: list[tuple[list[int], int, list[int]]]) -> None:
    engine = _engine(llama, num_blocks=12)
    vocab = llama.config.vocab_size
    ctx = llama.config.max_position_embeddings
    bad = [
        (dict(prompt=[], max_new_tokens=4), "empty"),
        (dict(prompt=[1, vocab], max_new_tokens=4), "outside the vocabulary"),
        (dict(prompt=[-1, 2], max_new_tokens=4), "outside the vocabulary"),
        (dict(prompt=[1, 2], max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt=[1] * 10, max_new_tokens=ctx), "context"),
        (dict(prompt=[1] * (ctx + 1), max_new_tokens=0), "context"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_token_ids=[vocab + 3]), "stop token"),
        (dict(prompt=[1] * 40, max_new_tokens=20), "pool has 12"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_strings=[b"x"]), "unsupported type bytes"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_strings=["ab", 7]), "unsupported type int"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_strings=5), "str or a sequence of str"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_strings=[""]), "stop string is empty"),
        (dict(prompt=[1, 2], max_new_tokens=4, stop_strings="ab"), "detokenize"),
    ]
    good = cases[0]
    rid = engine.add_request(good[0], max_new_tokens=good[1])
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request(**kwargs)  # type: ignore[arg-type]
        engine.step()  # the good request keeps going
    assert engine.num_waiting + engine.num_running <= 1
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate([good[0], []], max_new_tokens=3)  # nothing of it is queued
    assert set(engine._states) <= {rid}
    for _ in engine.stream():
        pass
    assert engine.finished[rid].tokens[0] == good[2]
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(Request(prompt=(), max_new_tokens=3))
    zero = engine.add_request(Request(prompt=(5, 6), max_new_tokens=0))
    assert engine.finished[zero].tokens[0] == [] and not engine.has_unfinished()
    _assert_pool_empty(engine)


def test_generate_and_callback(llama: LoadedModel,
                               cases: list[tuple[list[int], int, list[int]]]) -> None:
    engine = _engine(llama, num_blocks=96)
    seen: list[tuple[int, int]] = []
    out = engine.generate([c[0] for c in cases[:3]], max_new_tokens=[c[1] for c in cases[:3]],
                          on_token=lambda rid, tok: seen.append((rid, tok)))
    assert out.tokens == [c[2] for c in cases[:3]]
    assert len(seen) == sum(c[1] for c in cases[:3])
    _assert_pool_empty(engine)


def test_sampled_matches_generate_with_keys(llama: LoadedModel) -> None:
    """A sampled request draws from its own key: same tokens as ``generate`` alone with
    ``keys=sample_keys(seed, [0])``, whatever else is in the batch."""
    engine = _engine(llama, num_blocks=96)
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.95)
    prompts = [_prompts(llama.config.vocab_size)[i] for i in (0, 2, 5)]  # one width bucket
    out = engine.generate(prompts, max_new_tokens=10, sampling=sp, seed=7)
    for i, p in enumerate(prompts):
        ref = generate(llama.model, llama.params, [p], max_new_tokens=10, sampling=sp,
                       keys=sample_keys(7 + i, [0]))
        assert out.tokens[i] == ref.tokens[0], i
    _assert_pool_empty(engine)


@pytest.mark.parametrize(("budget", "prefix_caching", "swap_blocks"),
                         [(None, False, 0), (5, True, 0), (None, False, 6), (5, True, 6)])
def test_scheduler_fuzz_no_leaks(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch,
                                 budget: int | None, prefix_caching: bool,
                                 swap_blocks: int) -> None:
    """Random arrivals (prompts often starting alike), cancels and a tiny pool, with the
    model replaced by a stub (token = 7 + position of the row's last slot, so no
    compile): the pool invariants hold after every step, no step exceeds the token
    budget, the oldest running request is never preempted, every request that is not
    cancelled gets exactly its tokens, and nothing leaks. With swap preemption (a host
    pool of 6 pages, so some victims fall back to recompute) only waiting requests hold
    host slots, the slots held always equal the pool's used ones, and all return."""
    import jax.numpy as jnp

    import kvjax.engine.engine as eng

    def fake_step(model, params, k_pages, v_pages, tokens, positions, tables, lengths,
                  logit_index, sp, seeds, draws, *, attention, all_greedy
                  ):  # type: ignore[no-untyped-def]
        last = np.take_along_axis(positions, logit_index[:, None], axis=1)[:, 0]
        return jnp.asarray((7 + last) % 50), k_pages, v_pages

    monkeypatch.setattr(eng, "_engine_step", fake_step)
    rng = np.random.default_rng(1)
    engine = Engine(llama.model, llama.params, num_blocks=10, block_size=BS, max_batch=3,
                    prefill_chunk=CHUNK, max_tokens_per_step=budget,
                    prefix_caching=prefix_caching,
                    preemption="swap" if swap_blocks else "recompute",
                    swap_blocks=swap_blocks)
    heads = [rng.integers(0, 50, 12).tolist() for _ in range(3)]
    want: dict[int, int] = {}
    prompt_len: dict[int, int] = {}
    cancelled: set[int] = set()
    for _ in range(400):
        if rng.random() < 0.3:
            n_p = int(rng.integers(1, 25))
            n_new = int(rng.integers(0, 40 - n_p))
            head = heads[int(rng.integers(0, 3))][: int(rng.integers(0, n_p))]
            prompt = head + rng.integers(0, 50, n_p - len(head)).tolist()
            rid = engine.add_request(prompt, max_new_tokens=n_new)
            want[rid], prompt_len[rid] = n_new, n_p
        if rng.random() < 0.05 and engine._states:
            rid = int(rng.choice(sorted(engine._states)))
            assert engine.cancel(rid)
            cancelled.add(rid)
        oldest = engine._running[0] if engine._running else None
        before = oldest.preemptions if oldest else 0
        engine.step()
        _check_pool(engine)
        if engine.host_pool is not None:
            assert not any(st.swap_slots for st in engine._running)
            held = [slot for st in engine._waiting for slot in st.swap_slots]
            assert len(set(held)) == len(held) == swap_blocks - engine.host_pool.num_free
        if engine.step_metrics:
            assert engine.step_metrics[-1].computed_tokens <= engine.max_tokens_per_step
        if oldest is not None:
            assert oldest.preemptions == before
    for _ in engine.stream():
        pass
    _assert_pool_empty(engine)
    assert engine.metrics().preemptions > 0
    assert (engine.metrics().prefix_hit_tokens > 0) == prefix_caching
    if swap_blocks:
        assert engine.host_pool is not None and engine.host_pool.num_free == swap_blocks
        assert engine.metrics().swapped_in_blocks > 0
    for rid, n in want.items():
        out = engine.finished[rid].tokens[0]
        if rid in cancelled:
            assert engine.finished[rid].finish_reasons[0] == "cancelled"
        else:  # token i was sampled at position prompt_len + i - 1
            assert out == [(7 + prompt_len[rid] + i - 1) % 50 for i in range(n)], rid


def _detok(ids: Any) -> str:
    """A stand-in detokenizer: one letter per token id."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_strings(llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]]) -> None:
    """A request ends at the first token whose output text contains a stop string (the
    token is kept), whether the string spans tokens or not; the reference is the dense
    output cut where its own text first contains the string."""
    engine = _engine(llama, num_blocks=96, detokenize=_detok)
    want, rids = [], []
    for i, (p, n, ref) in enumerate(cases[:4]):
        text = _detok(ref)
        stops = [text[5:7], "~"] if i % 2 == 0 else text[-1]  # "~" never appears
        cut = next(k for k in range(1, n + 1)
                   if any(st in _detok(ref[:k]) for st in ([stops] if isinstance(stops, str)
                                                           else stops)))
        want.append((ref[:cut], "stop"))
        rids.append(engine.add_request(p, max_new_tokens=n, stop_strings=stops))
    p, n, ref = cases[4]
    want.append((ref, "length"))
    rids.append(engine.add_request(p, max_new_tokens=n, stop_strings=["~"]))
    for _ in engine.stream():
        pass
    for rid, (tokens, reason) in zip(rids, want, strict=True):
        assert engine.finished[rid].tokens[0] == tokens
        assert engine.finished[rid].finish_reasons[0] == reason
    assert any(len(t) < n for (t, _), (_, n, _) in zip(want, cases, strict=False))
    _assert_pool_empty(engine)


def test_token_budget_bounds_every_step(llama: LoadedModel,
                                        cases: list[tuple[list[int], int, list[int]]]) -> None:
    """With ``max_tokens_per_step=10`` no step computes more than 10 tokens (unbounded,
    four prompts admitted together would take 4 x 8 in the first step) and at most one
    chunk row runs a step (its forward is [1, 8]); outputs are unchanged."""
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        _engine(llama, num_blocks=96, max_tokens_per_step=BATCH - 1)
    engine = _engine(llama, num_blocks=96, max_tokens_per_step=10)
    out = engine.generate([c[0] for c in cases], max_new_tokens=[c[1] for c in cases])
    assert out.tokens == [c[2] for c in cases]
    steps = engine.step_metrics
    assert max(s.computed_tokens for s in steps) == 10
    assert any(s.prefill_tokens and s.decode_tokens for s in steps)
    # One chunk row a step (10 // 8): the first prompt alone, then decodes + a chunk.
    assert engine.max_chunk_rows == 1
    assert steps[0].admitted == 1 and steps[0].prefill_tokens == 5
    assert all(sum(1 for shape in s.shapes if shape[1] > 1) <= 1 for s in steps)
    assert max(s.rows for s in steps) == BATCH
    _assert_pool_empty(engine)


@pytest.fixture(scope="module")
def shared_cases(llama: LoadedModel) -> list[tuple[list[int], int, list[int]]]:
    """Prompts that share a 13-token prefix (three full blocks) two by two."""
    rng = np.random.default_rng(2)
    vocab = llama.config.vocab_size
    heads = [rng.integers(3, vocab, 13).tolist() for _ in range(2)]
    out = []
    for i, (tail, n) in enumerate([(4, 9), (9, 12), (2, 7), (14, 10), (6, 11), (11, 8)]):
        p = heads[i % 2] + rng.integers(3, vocab, tail).tolist()
        ref = generate(llama.model, llama.params, [p], max_new_tokens=n, cache="dense")
        out.append((p, n, ref.tokens[0]))
    return out


@pytest.mark.parametrize("num_blocks", [96, 12])
def test_prefix_caching_matches_dense(llama: LoadedModel, num_blocks: int,
                                      shared_cases: list[tuple[list[int], int, list[int]]]
                                      ) -> None:
    """Shared prefixes are computed once and reused; with a 12-block pool requests are
    also preempted and find their own committed blocks again. Outputs never change."""
    engine = _engine(llama, num_blocks=num_blocks, prefix_caching=True)
    rids, streamed = _run_staggered(engine, shared_cases, {})
    for i, (_, _, ref) in enumerate(shared_cases):
        assert engine.finished[rids[i]].tokens[0] == ref, i
        assert streamed[rids[i]] == ref
    m = engine.metrics()
    per_request = [engine.request_metrics[r] for r in rids.values()]
    assert m.prefix_hit_tokens >= 12 and 0 < m.prefix_hit_rate < 1
    assert sum(r.cached_tokens for r in per_request) == sum(
        s.cached_tokens for s in engine.step_metrics) > 0
    if num_blocks == 12:
        assert m.preemptions > 0
        assert any(r.preemptions and r.cached_tokens for r in per_request)
    _assert_pool_empty(engine)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("num_blocks", [96, 12], ids=["roomy", "preempting"])
def test_decode_bursts_match_dense(llama: LoadedModel,
                                   cases: list[tuple[list[int], int, list[int]]],
                                   num_blocks: int, overlap: bool) -> None:
    """decode_steps=3: once nothing waits, decodes run three forwards per step in a device
    loop; outputs (with a stop id, and with a pool that forces preemption) equal the
    dense reference, streamed tokens equal the outputs, and nothing leaks. With
    overlap_bursts the same, requests arriving while a burst is in flight."""
    from kvjax.engine.engine import compiled_programs

    engine = _engine(llama, num_blocks=num_blocks, decode_steps=3, overlap_bursts=overlap)
    engine.precompile(max_tokens=32)
    compiled = compiled_programs()
    stop_tok = cases[2][2][4]
    rids, streamed = _run_staggered(engine, cases, {2: stop_tok})
    assert compiled_programs() == compiled  # the burst was precompiled too
    for i, (_, _, ref) in enumerate(cases):
        want = ref[: ref.index(stop_tok) + 1] if i == 2 else ref
        assert engine.finished[rids[i]].tokens[0] == want, i
        assert streamed[rids[i]] == want
    bursts = [s for s in engine.step_metrics if s.decode_steps == 3]
    assert bursts and all(s.prefill_tokens == 0 for s in bursts)
    if not overlap:  # an overlapped burst in flight is read even if a request arrived
        assert all(s.waiting == 0 for s in bursts)
    assert max(s.new_tokens for s in bursts) > BATCH  # several tokens per row per step
    if num_blocks == 12:
        assert engine.metrics().preemptions > 0
    _assert_pool_empty(engine)


def test_decode_bursts_with_sampling_and_prefix_cache(llama: LoadedModel) -> None:
    """Sampled requests draw the same tokens in bursts as one step at a time (the i-th
    draw's key does not depend on how steps are grouped), with prefix caching on."""
    prompts = [p[:12] for p in _prompts(llama.config.vocab_size)[:5]]
    prompts[3] = prompts[0][:8] + prompts[3][:6]  # a shared prefix
    sp = SamplingParams(temperature=0.9, top_k=20)
    outs = []
    for steps in (1, 4):
        engine = _engine(llama, num_blocks=64, prefix_caching=True, decode_steps=steps)
        outs.append(engine.generate(prompts, max_new_tokens=[9, 14, 3, 11, 6], sampling=sp,
                                    seed=5).tokens)
        if steps > 1:
            assert any(s.decode_steps == 4 for s in engine.step_metrics)
        _assert_pool_empty(engine)
    assert outs[0] == outs[1]
    assert [len(t) for t in outs[0]] == [9, 14, 3, 11, 6]


def test_decode_steps_must_be_positive(llama: LoadedModel) -> None:
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="decode_steps"):
            _engine(llama, num_blocks=16, decode_steps=bad)
    with pytest.raises(ValueError, match="overlap_bursts must be a bool"):
        _engine(llama, num_blocks=16, decode_steps=2, overlap_bursts=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("prefix_caching", "staging"),
                         [(False, "pageable"), (True, "pageable"), (False, "pinned-slots")],
                         ids=["plain", "prefix-cache", "pinned-slots"])
def test_preemption_swap_matches_dense_and_recomputes_nothing(
        llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]],
        prefix_caching: bool, staging: str) -> None:
    """preemption="swap" with a 12-block pool: victims' K/V go to host slots and come
    back at re-admission, so outputs equal the dense reference and no token is prefilled
    twice (recompute preemption, same pool, prefills more); host slots all come back."""
    prompts = sum(len(p) for p, _, _ in cases)
    recompute = _engine(llama, num_blocks=12, prefix_caching=prefix_caching)
    _run_staggered(recompute, cases, {})
    engine = _engine(llama, num_blocks=12, prefix_caching=prefix_caching,
                     preemption="swap", swap_blocks=64, host_staging=staging)
    rids, streamed = _run_staggered(engine, cases, {})
    for i, (_, _, ref) in enumerate(cases):
        assert engine.finished[rids[i]].tokens[0] == ref, i
        assert streamed[rids[i]] == ref
    m = engine.metrics()
    assert m.preemptions > 0 and m.swapped_out_blocks > 0 and m.swapped_in_blocks > 0
    assert m.swapped_in_blocks <= m.swapped_out_blocks
    # The prompts share no prefix: every prompt token is computed exactly once (with the
    # prefix cache a re-admitted victim may also find its own committed blocks).
    prefilled = sum(s.prefill_tokens for s in engine.step_metrics)
    assert prefilled == prompts
    assert sum(s.prefill_tokens for s in recompute.step_metrics) > prefilled
    stats = engine.swap_stats()
    assert stats is not None and stats.bytes_to_host > 0 and stats.bytes_to_device > 0
    assert engine.host_pool is not None and engine.host_pool.num_free == 64
    _assert_pool_empty(engine)


def test_swap_falls_back_to_recompute_and_cancel_frees_slots(
        llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]]) -> None:
    """A host pool too small for a victim makes it recompute (outputs unchanged); a
    cancelled swapped-out request gives its host slots back."""
    engine = _engine(llama, num_blocks=12, preemption="swap", swap_blocks=3)
    rids, _ = _run_staggered(engine, cases, {})
    for i, (_, _, ref) in enumerate(cases):
        assert engine.finished[rids[i]].tokens[0] == ref, i
    assert engine.metrics().preemptions > 0
    assert engine.host_pool is not None and engine.host_pool.num_free == 3
    _assert_pool_empty(engine)

    engine = _engine(llama, num_blocks=12, preemption="swap", swap_blocks=64)
    for p, n, _ in cases:
        engine.add_request(p, max_new_tokens=n)
    while not any(s.swap_slots for s in engine._waiting):
        engine.step()
    swapped = next(s for s in engine._waiting if s.swap_slots)
    held = len(swapped.swap_slots)
    assert engine.host_pool is not None and engine.host_pool.num_free <= 64 - held
    assert engine.cancel(swapped.rid)
    for _ in engine.stream():
        pass
    assert engine.host_pool.num_free == 64
    _assert_pool_empty(engine)


def test_preemption_arguments_checked(llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="preemption must be one of"):
        _engine(llama, num_blocks=16, preemption="drop")
    with pytest.raises(ValueError, match="swap_blocks"):
        _engine(llama, num_blocks=16, preemption="swap")
    with pytest.raises(ValueError, match="swap_blocks is only used"):
        _engine(llama, num_blocks=16, swap_blocks=8)
    with pytest.raises(ValueError, match="staging"):
        _engine(llama, num_blocks=16, preemption="swap", swap_blocks=8, host_staging="fast")


def test_decode_rows_follow_the_running_count(llama: LoadedModel,
                                              cases: list[tuple[list[int], int, list[int]]]
                                              ) -> None:
    """max_batch 16: ten requests decode in 16-row forwards, and once at most eight are
    left, in 8-row ones (MIN_DECODE_ROWS); every output still equals the dense
    reference, every shape was precompiled, and nothing leaks."""
    from kvjax.engine.engine import MIN_DECODE_ROWS, compiled_programs

    assert MIN_DECODE_ROWS == 8
    engine = Engine(llama.model, llama.params, num_blocks=128, block_size=BS, max_batch=16,
                    prefill_chunk=CHUNK, max_tokens_per_step=8 * CHUNK)
    assert set(engine.step_shapes(32)) == {(8, 1, 8), (16, 1, 8)} | {
        (r, CHUNK, 8) for r in (1, 2, 4, 8)}
    engine.precompile(max_tokens=32)
    compiled = compiled_programs()
    work = cases + cases[:3]
    rids = [engine.add_request(p, max_new_tokens=n) for p, n, _ in work]
    while engine.has_unfinished():
        engine.step()
        _check_pool(engine)
    assert compiled_programs() == compiled
    for rid, (_, _, ref) in zip(rids, work, strict=True):
        assert engine.finished[rid].tokens[0] == ref
    decode_shapes = {sh for s in engine.step_metrics for sh in s.shapes if sh[1] == 1}
    assert decode_shapes == {(16, 1, 8), (8, 1, 8)}
    decoded = {sh[0]: [s.decode_tokens for s in engine.step_metrics if sh in s.shapes]
               for sh in decode_shapes}  # one token per decoding row (no bursts here)
    assert max(decoded[8]) <= 8 < min(decoded[16])
    _assert_pool_empty(engine)


def _no_stop_cases(cases: list[tuple[list[int], int, list[int]]]
                   ) -> list[tuple[list[int], int, list[int]]]:
    """Four cases with no stop ids and 9-16 new tokens (case 2 is the one stopped)."""
    return [cases[i] for i in (0, 5, 6, 3)]


def test_overlapped_bursts_match_dense_and_run_ahead(
        llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]]) -> None:
    """With no stop ids and nothing waiting, each step dispatches the next burst before
    reading its own (``overlapped_bursts`` counts them); outputs, streamed tokens and
    the pool are as without overlap, and no program is compiled after precompile."""
    from kvjax.engine.engine import compiled_programs

    work = _no_stop_cases(cases)
    engine = _engine(llama, num_blocks=96, decode_steps=3, overlap_bursts=True)
    engine.precompile(max_tokens=32)
    compiled = compiled_programs()
    rids = [engine.add_request(p, max_new_tokens=n) for p, n, _ in work]
    streamed: dict[int, list[int]] = {}
    for rid, tok in engine.stream():
        streamed.setdefault(rid, []).append(tok)
        _check_pool(engine)
    assert compiled_programs() == compiled
    assert engine.overlapped_bursts >= 2
    for rid, (_, n, ref) in zip(rids, work, strict=True):
        assert engine.finished[rid].tokens[0] == ref == streamed[rid]
        assert engine.request_metrics[rid].output_tokens == n
    _assert_pool_empty(engine)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix-cache"])
def test_cancel_while_a_burst_is_in_flight(llama: LoadedModel,
                                           cases: list[tuple[list[int], int, list[int]]],
                                           prefix_caching: bool) -> None:
    """Cancelling a request whose next burst is already dispatched reads that burst
    first (the next step returns its tokens), then frees everything; the others finish
    with their reference tokens and nothing leaks."""
    work = _no_stop_cases(cases)
    engine = _engine(llama, num_blocks=96, decode_steps=3, overlap_bursts=True,
                     prefix_caching=prefix_caching)
    rids = [engine.add_request(p, max_new_tokens=n) for p, n, _ in work]
    streamed: dict[int, list[int]] = {rid: [] for rid in rids}
    while engine._ahead is None:  # white box: until a burst is in flight
        for rid, tok in engine.step():
            streamed[rid].append(tok)
    left = {s.rid: s.request.max_new_tokens - len(s.output) for s in engine._ahead.states}
    victim = max(left, key=left.__getitem__)
    assert left[victim] > 2 * 3  # it outlives the burst read now and the one after
    before = len(streamed[victim])
    assert engine.cancel(victim)
    assert engine._ahead is None and not engine.cancel(victim)
    while engine.has_unfinished():
        for rid, tok in engine.step():
            streamed[rid].append(tok)
        _check_pool(engine)
    ref = dict(zip(rids, (r for _, _, r in work), strict=True))
    out = engine.finished[victim]
    assert out.finish_reasons == ["cancelled"]
    assert len(streamed[victim]) > before  # the in-flight burst's tokens were delivered
    assert out.tokens[0] == streamed[victim] == ref[victim][: len(out.tokens[0])]
    for rid in rids:
        if rid != victim:
            assert engine.finished[rid].tokens[0] == ref[rid] == streamed[rid]
    _assert_pool_empty(engine)


def test_overlapped_bursts_with_sampling(llama: LoadedModel) -> None:
    """Sampled draws do not depend on whether bursts overlap (each row's draw counter
    continues across the device-side hand-off)."""
    prompts = [p[:12] for p in _prompts(llama.config.vocab_size)[:4]]
    sp = SamplingParams(temperature=0.9, top_k=20)
    outs = []
    for overlap in (False, True):
        engine = _engine(llama, num_blocks=64, decode_steps=4, overlap_bursts=overlap)
        outs.append(engine.generate(prompts, max_new_tokens=[9, 14, 13, 11], sampling=sp,
                                    seed=5).tokens)
        assert (engine.overlapped_bursts > 0) == overlap
        _assert_pool_empty(engine)
    assert outs[0] == outs[1]


def _cut_at_stop(ref: list[int], stop: int) -> list[int]:
    """``ref`` up to and including the first ``stop`` (all of it if there is none)."""
    return ref[: ref.index(stop) + 1] if stop in ref else ref


def test_overlapped_bursts_with_stop_ids(
        llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]]) -> None:
    """Stop ids no longer switch overlap off: a row that stops in a burst has its tokens
    in the burst dispatched after it dropped, so every output is its reference cut at
    its stop id, streamed tokens equal the outputs, nothing leaks; a lone request that
    stops in its first burst leaves the burst dispatched after it discarded unread."""
    engine = _engine(llama, num_blocks=96, decode_steps=3, overlap_bursts=True)
    # stops 1st-7th tokens in: inside a burst, at its end, in the prefill's token
    rids = {}
    for i, (p, _, ref) in enumerate(cases):
        stop = ref[[1, 3, 4, 0, 2, 6, 5][i]]
        rids[engine.add_request(p, max_new_tokens=len(ref), stop_token_ids=[stop])] = (
            _cut_at_stop(ref, stop))
    streamed: dict[int, list[int]] = {rid: [] for rid in rids}
    for rid, tok in engine.stream():
        streamed[rid].append(tok)
        _check_pool(engine)
    assert engine.overlapped_bursts > 0
    for rid, want in rids.items():
        out = engine.finished[rid]
        assert out.tokens[0] == want == streamed[rid]
        assert out.finish_reasons == ["stop"]  # each stop id is in its reference
    _assert_pool_empty(engine)

    lone = _engine(llama, num_blocks=32, decode_steps=3, overlap_bursts=True)
    p, _, ref = cases[6]
    rid = lone.add_request(p, max_new_tokens=len(ref), stop_token_ids=[ref[2]])
    got = [tok for _, tok in lone.stream()]
    assert got == _cut_at_stop(ref, ref[2]) == lone.finished[rid].tokens[0]
    assert lone.finished[rid].finish_reasons == ["stop"]
    assert lone.discarded_bursts == 1 and lone._ahead is None
    _assert_pool_empty(lone)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_adds_and_cancels_with_overlapped_bursts(
        llama: LoadedModel, cases: list[tuple[list[int], int, list[int]]], seed: int) -> None:
    """A random schedule of arrivals (random budgets, half of them with a stop id from
    their reference) and cancellations between steps: every finished output is its
    reference cut at its stop id and budget, every cancelled one a prefix of it, the
    pool is consistent after every step and empty at the end."""
    rng = np.random.default_rng(seed)
    engine = _engine(llama, num_blocks=int(rng.choice([24, 96])), decode_steps=3,
                     overlap_bursts=True, prefix_caching=bool(rng.integers(2)))
    want: dict[int, list[int]] = {}
    streamed: dict[int, list[int]] = {}
    for step in range(200):
        if step < 40 and rng.random() < 0.3:
            prompt, n, ref = cases[int(rng.integers(len(cases)))]
            budget = int(rng.integers(1, n + 1))
            stops = [ref[int(rng.integers(n))]] if rng.random() < 0.5 else []
            rid = engine.add_request(prompt, max_new_tokens=budget, stop_token_ids=stops)
            want[rid] = _cut_at_stop(ref[:budget], stops[0]) if stops else ref[:budget]
            streamed[rid] = []
        live = [r for r in want if r not in engine.finished]
        if live and rng.random() < 0.08:
            engine.cancel(int(rng.choice(live)))
        for rid, tok in engine.step():
            streamed[rid].append(tok)
        _check_pool(engine)
        if step >= 40 and not engine.has_unfinished():
            break
    assert not engine.has_unfinished()
    for rid, ref in want.items():
        out = engine.finished[rid]
        assert out.tokens[0] == streamed[rid]
        if out.finish_reasons == ["cancelled"]:
            assert out.tokens[0] == ref[: len(out.tokens[0])]
        else:
            assert out.tokens[0] == ref
    assert engine.overlapped_bursts > 0  # the schedules do run bursts ahead
    _assert_pool_empty(engine)
