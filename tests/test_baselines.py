"""Tests: what every baseline keeps, against plain numpy references; decode through the cache
for every method, per layer and per KV head; scoring dtypes; which layers score under reuse;
PyramidKV's budgets; and the remaining bad inputs (config, API, CLI) and streaming output."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import chunkkv
import generate as cli_module
from chunkkv import CompressionConfig, CompressionError
from cli import TextStream, summary
from conftest import (assert_user_error, byte_tokenizer, cli, kept_positions, prefill, reference_logits, reference_select,
                      tiny_model)
from generate import Prefilled, PromptError, generate, sample

torch.set_grad_enabled(False)
NEAR_TIE = 1e-5  # float32 scoring vs the float64 references: scores closer than this (relative) may rank either way


# ---------------------------------------------------------------------------------------
# Plain references: numpy in float64, loops where they read best

def ref_attention(q: torch.Tensor, k: torch.Tensor, n_queries: int) -> np.ndarray:
    """Softmax attention of the last `n_queries` prompt queries over the keys, causal: query i
    at position p sees keys 0..p. q [B, Hq, T, D], k [B, Hkv, T, D] -> [B, Hq, n, T]."""
    q, k = q.double().numpy(), k.double().numpy()
    n_batch, n_heads, n_prompt, head_dim = q.shape
    group = n_heads // k.shape[1]
    n_queries = min(n_queries, n_prompt)
    out = np.zeros((n_batch, n_heads, n_queries, n_prompt))
    for b in range(n_batch):
        for h in range(n_heads):
            for i in range(n_queries):
                pos = n_prompt - n_queries + i
                logits = k[b, h // group, :pos + 1] @ q[b, h, pos] / math.sqrt(head_dim)
                weights = np.exp(logits - logits.max())
                out[b, h, i, :pos + 1] = weights / weights.sum()
    return out


def ref_head_scores(q, k, n_queries) -> np.ndarray:
    """[B, Hkv, T]: attention summed over the queries, averaged over each KV head's query heads."""
    attention = ref_attention(q, k, n_queries).sum(axis=2)  # [B, Hq, T]
    n_batch, n_heads, n_prompt = attention.shape
    return attention.reshape(n_batch, k.shape[1], n_heads // k.shape[1], n_prompt).mean(axis=2)


def ref_top_tokens(scores, budget: int, window: int) -> list[int]:
    """The budget - window best prefix tokens (ties: earlier first) and the window."""
    n_prompt = len(scores)
    if n_prompt <= budget:
        return list(range(n_prompt))
    n_prefix = n_prompt - window
    ranked = sorted(range(n_prefix), key=lambda p: (-scores[p], p))
    return sorted(ranked[:budget - window] + list(range(n_prefix, n_prompt)))


def ref_max_pool(scores, kernel: int) -> list[float]:
    """Each score replaced by the largest within kernel // 2 places either side (clipped at the ends)."""
    half = kernel // 2
    return [max(scores[max(0, j - half):j + half + 1]) for j in range(len(scores))]


def ref_fastgen(scores, tokens, config: CompressionConfig) -> tuple[int, list[int], float]:
    """(policy, kept positions, margin) of one KV head: the first of FastGen's nested policies
    whose kept set recovers `config.recovery` of the head's attention mass."""
    n_prompt = len(scores)
    window = set(range(max(0, n_prompt - config.window), n_prompt))
    special = window | {p for p in range(n_prompt) if tokens[p] in config.special_ids}
    punctuation = special | {p for p in range(n_prompt) if tokens[p] in config.punctuation_ids}
    heavy = set(sorted(range(n_prompt), key=lambda p: -scores[p])[:max(1, round(0.3 * n_prompt))])
    frequent = punctuation | heavy
    local = frequent | set(range(n_prompt - round(0.3 * n_prompt), n_prompt))
    policies = [special, punctuation, frequent, local, set(range(n_prompt))]
    shares = [sum(scores[p] for p in kept) / sum(scores) for kept in policies]
    margin = min([boundary_gap(scores, [p in heavy for p in range(n_prompt)])] +
                 [abs(share - config.recovery) for share in shares])
    for policy, (kept, share) in enumerate(zip(policies, shares)):
        if policy == 4 or (config.recovery < 1 and share >= config.recovery):
            return policy, sorted(kept), margin


def boundary_gap(values, labels) -> float:
    """The closest call of a ranking: the smallest difference, relative to the largest value,
    between two values on different sides of its cut (labels: which side). Exact ties (one value
    pooled into several places) stay exact in float32 and go by position: no close call."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    gaps = np.abs(values[:, None] - values[None, :])[(labels[:, None] != labels[None, :])]
    gaps = gaps[gaps > 0]
    return float(gaps.min() / np.abs(values).max()) if gaps.size else math.inf


def ref_chunks(scores, budget: int, config: CompressionConfig) -> tuple[list[int], float]:
    """(kept, margin): ChunkKV's choice (test_chunkkv.reference_select) and its closest call
    between chunks kept whole, cut short and dropped."""
    kept = reference_select(scores, budget, config.window, config.chunk_size)
    n_prefix, size = len(scores) - config.window, config.chunk_size
    starts = range(0, n_prefix, size)
    chunk_scores = [sum(scores[s:s + size]) for s in starts]
    n_in = [len(set(range(s, min(s + size, n_prefix))) & set(kept)) for s in starts]
    sides = [2 if n == min(size, n_prefix - s) else int(n > 0) for n, s in zip(n_in, starts)]
    return kept, boundary_gap(chunk_scores, sides)


def ref_tokens(scores, budget: int, config: CompressionConfig) -> tuple[list[int], float]:
    """(kept, margin): H2O ranks its scores as they are; SnapKV and PyramidKV max-pool the prefix first."""
    n_prefix = len(scores) - config.window
    if config.method != "h2o":
        scores = ref_max_pool(scores[:n_prefix], config.pool_kernel) + scores[n_prefix:]
    kept = ref_top_tokens(scores, budget, config.window)
    return kept, boundary_gap(scores[:n_prefix], [p in kept for p in range(n_prefix)])


def ref_entropy_gated(scores, budget: int, config: CompressionConfig, n_spiky: int = 4) -> tuple[list[int], float]:
    """(kept, margin): EG-ChunkKV as kvpress's EntropyGatedChunkKVPress.compress loops (NVIDIA/kvpress
    #263; torch's median: the lower one), on the prefix before the window, which is kept. Its margin:
    the closest pair of chunk means, of chunk entropies or of prefix scores."""
    n_prefix = len(scores) - config.window
    room = budget - config.window
    chunks = [list(range(s, min(s + config.chunk_size, n_prefix))) for s in range(0, n_prefix, config.chunk_size)]
    means = [sum(scores[p] for p in chunk) / len(chunk) for chunk in chunks]

    def entropy(chunk):
        total = sum(scores[p] for p in chunk)
        shares = [scores[p] / (total + 1e-8) for p in chunk]
        h = -sum(x * math.log(x + 1e-8) for x in shares)
        return 0.0 if len(chunk) == 1 else min(1.0, max(0.0, h / math.log(len(chunk))))

    entropies = [entropy(chunk) for chunk in chunks]
    median = lambda values: sorted(values)[(len(values) - 1) // 2]  # noqa: E731
    kept = set()
    for i in sorted(range(len(chunks)), key=lambda i: (-means[i], i)):
        if room <= 0:
            break
        take = min(len(chunks[i]), room)
        if means[i] >= median(means) and entropies[i] < median(entropies):  # important but spiky
            take = min(take, n_spiky)
        kept |= set(sorted(chunks[i], key=lambda p: (-scores[p], p))[:take])
        room -= take
    kept |= set(sorted((p for p in range(n_prefix) if p not in kept), key=lambda p: (-scores[p], p))[:max(room, 0)])
    margin = min(boundary_gap(values, range(len(values))) for values in (means, entropies, scores[:n_prefix]))
    return sorted(kept) + list(range(n_prefix, len(scores))), margin


def reference_keep(config: CompressionConfig, q, k, tokens, budget: int) -> tuple[list, float]:
    """(kept[b][kv_head] as sorted lists, margin): what `config` keeps at this budget, written
    from the method's definition; margin is the closest call a float32 ranking had to make."""
    n_batch, n_kv_heads, n_prompt = k.shape[:3]
    if config.method == "full" or (n_prompt <= budget and config.method != "fastgen"):
        return [[list(range(n_prompt))] * n_kv_heads] * n_batch, math.inf
    if config.method == "streaming":
        recent = list(range(n_prompt - budget + config.n_sinks, n_prompt))
        return [[list(range(config.n_sinks)) + recent] * n_kv_heads] * n_batch, math.inf
    if config.method in ("chunkkv", "eg-chunkkv") and not config.per_head:  # one choice per layer: every head, every window query
        scores = ref_attention(q, k, config.window).sum(axis=(1, 2))  # [B, T]
        choices = [(ref_chunks if config.method == "chunkkv" else ref_entropy_gated)(row, budget, config)
                   for row in scores.tolist()]
        return [[kept] * n_kv_heads for kept, _ in choices], min(margin for _, margin in choices)
    scores = ref_head_scores(q, k, n_prompt if config.method == "h2o" else config.window).tolist()
    kept, margin = [], math.inf
    for b in range(n_batch):
        kept.append([])
        for row in scores[b]:
            if config.method == "chunkkv":
                head_kept, head_margin = ref_chunks(row, budget, config)
            elif config.method == "fastgen":
                _, head_kept, head_margin = ref_fastgen(row, tokens[b].tolist(), config)
            else:
                head_kept, head_margin = ref_tokens(row, budget, config)
            kept[b].append(head_kept)
            margin = min(margin, head_margin)
    return kept, margin


def ref_pyramid_line(budget: int, window: int, n_layers: int, beta: float, n_prompt: int) -> list[float]:
    """PyramidKV's prefix budget per layer, as real numbers: a line from 2(B-w) - (B-w)/beta down
    to (B-w)/beta; if the top would exceed the T - w prefix, it is T - w and the bottom rises so
    the mean stays B - w (Zefan-Cai/PyramidKV, pyramidkv_utils.py)."""
    prefix = budget - window
    if n_layers == 1:
        return [prefix]
    low = prefix / beta
    high = 2 * prefix - low
    if high > n_prompt - window:
        high = n_prompt - window
        low = 2 * prefix - high
    return [high - (high - low) * layer / (n_layers - 1) for layer in range(n_layers)]


def as_lists(positions: torch.Tensor, n_kv_heads: int) -> list:
    """Library positions [B, N] or [B, Hkv, N] as kept[b][kv_head] lists, -1 padding dropped."""
    if positions.dim() == 2:
        positions = positions[:, None].expand(-1, n_kv_heads, -1)
    return [[[p for p in row if p >= 0] for row in rows] for rows in positions.tolist()]


# ---------------------------------------------------------------------------------------
# Every selection equals its reference, per row and per KV head

@st.composite
def scored_case(draw, methods):
    method = draw(st.sampled_from(methods))
    n_heads, n_kv_heads = draw(st.sampled_from([(4, 2), (2, 2), (6, 3), (4, 1)]))
    window = draw(st.integers(2 if method == "streaming" else 1, 8))  # streaming: a sink and a recent token
    n_prompt = draw(st.integers(1, 60))
    budget = draw(st.integers(window + 1, max(window + 1, n_prompt + 3)))
    config = CompressionConfig(
        method=method.removesuffix("-per-head"), per_head=method.endswith("-per-head"),
        budget=budget if chunkkv.METHODS[method.removesuffix("-per-head")].budgeted else None,
        window=window, chunk_size=draw(st.integers(1, 9)), pool_kernel=draw(st.sampled_from([1, 3, 5, 7])),
        n_sinks=draw(st.integers(1, max(1, window - 1))), recovery=draw(st.floats(0.05, 1.0)),
        special_ids=(0, 1), punctuation_ids=(2, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.5, 2.0, 4.0]))  # flat to peaked attention
    n_batch = draw(st.integers(1, 2))
    q = torch.randn(n_batch, n_heads, n_prompt, 8, generator=gen) * scale
    k = torch.randn(n_batch, n_kv_heads, n_prompt, 8, generator=gen) * scale
    tokens = torch.randint(0, 8, (n_batch, n_prompt), generator=gen)
    return config, q, k, tokens


def check_against_reference(config, q, k, tokens, budget):
    positions, _ = chunkkv.keep_positions(config, q, k, budget, layer=0, tokens=tokens)
    expected, margin = reference_keep(config, q, k, tokens, budget)
    assume(margin > NEAR_TIE)
    assert as_lists(positions, k.shape[1]) == expected


@settings(max_examples=150, deadline=None)
@given(scored_case(("snapkv", "h2o", "chunkkv", "chunkkv-per-head", "streaming", "full")))
def test_token_and_chunk_methods_keep_what_their_reference_keeps(case):
    config, q, k, tokens = case
    check_against_reference(config, q, k, tokens, config.budget or q.shape[2])


@settings(max_examples=500, deadline=None)
@given(st.integers(20, 60), st.integers(1, 8), st.integers(2, 9), st.floats(0.0, 1.0), st.sampled_from([0.5, 2.0, 4.0]),
       st.integers(0, 2**31 - 1))
def test_eg_chunkkv_keeps_what_kvpress_loop_keeps(n_prompt, window, chunk_size, share, scale, seed):
    """Budgets below the prompt, where chunks are cut to their top tokens and the rest tops the budget up."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, n_prompt, 8, generator=gen) * scale for heads in (4, 2))
    budget = window + 1 + round(share * (n_prompt - window - 2))
    config = CompressionConfig(method="eg-chunkkv", budget=budget, window=window, chunk_size=chunk_size)
    check_against_reference(config, q, k, None, budget)


@settings(max_examples=150, deadline=None)
@given(scored_case(("fastgen",)))
def test_fastgen_keeps_the_cheapest_sufficient_policy(case):
    config, q, k, tokens = case
    positions, _ = chunkkv.keep_positions(config, q, k, q.shape[2], layer=0, tokens=tokens)
    reference_scores = ref_head_scores(q, k, config.window).tolist()
    for b in range(q.shape[0]):
        for h in range(k.shape[1]):
            _, expected, margin = ref_fastgen(reference_scores[b][h], tokens[b].tolist(), config)
            assume(margin > NEAR_TIE)
            assert [p for p in positions[b, h].tolist() if p >= 0] == expected


@settings(max_examples=60, deadline=None)
@given(scored_case(("pyramidkv",)), st.integers(2, 6), st.floats(1.0, 40.0), st.floats(0.05, 1.0))
def test_pyramidkv_is_snapkv_at_the_papers_per_layer_budgets(case, n_layers, beta, keep):
    config, q, k, tokens = case
    n_prompt = k.shape[2]
    config = CompressionConfig(method="pyramidkv", keep=keep, window=config.window, pool_kernel=config.pool_kernel,
                               pyramid_beta=beta)
    try:
        mean = config.prompt_budget(n_prompt)
    except CompressionError:
        return
    budgets = config.layer_budgets(n_prompt, n_layers)
    if mean < n_prompt:
        line = ref_pyramid_line(mean, config.window, n_layers, beta, n_prompt)
        # within rounding of the line; 1e-9: the reference line is in floats, the library's in exact fractions
        assert all(abs(b - config.window - x) < 1 + 1e-9 for b, x in zip(budgets, line))
        assert sum(budgets) == n_layers * mean
    else:
        assert budgets == [n_prompt] * n_layers
    for layer, budget in enumerate(budgets):
        check_against_reference(config, q, k, tokens, budget)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**31 - 1), st.data())
def test_token_selection_breaks_ties_toward_the_earlier_position(n_batch, n_heads, n_prompt, seed, data):
    window = data.draw(st.integers(1, 8))
    budget = data.draw(st.integers(window + 1, max(window + 1, n_prompt + 2)))
    scores = torch.randint(0, 4, (n_batch, n_heads, n_prompt), generator=torch.Generator().manual_seed(seed))
    kept = chunkkv.select_tokens(scores.float(), budget, window)  # small integers: ties everywhere
    for b in range(n_batch):
        for h in range(n_heads):
            assert kept[b, h].tolist() == ref_top_tokens(scores[b, h].tolist(), budget, window)


# ---------------------------------------------------------------------------------------
# PyramidKV's budgets

@settings(max_examples=300, deadline=None)
@given(st.integers(1, 600), st.floats(0.01, 1.0), st.integers(1, 40), st.integers(1, 40), st.floats(1.0, 100.0))
def test_pyramidkv_mean_budget_is_the_budget_for_every_keep(n_prompt, keep, window, n_layers, beta):
    config = CompressionConfig(method="pyramidkv", keep=keep, window=window, pyramid_beta=beta)
    try:
        mean = config.prompt_budget(n_prompt)
    except CompressionError:
        return
    budgets = config.layer_budgets(n_prompt, n_layers)
    assert sum(budgets) == n_layers * mean
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # non-increasing with depth
    assert all(min(window, n_prompt) <= b <= n_prompt for b in budgets)


def test_pyramidkv_keeps_three_quarters_at_keep_075():
    budgets = CompressionConfig(method="pyramidkv", keep=0.75).layer_budgets(208, 30)
    assert budgets[0] == 208 and sum(budgets) == 30 * 156  # the top layer keeps the whole prompt, the mean 75 %


# ---------------------------------------------------------------------------------------
# Decode through the cache, every method, per layer and per KV head

DECODE_CONFIGS = [
    CompressionConfig(method="streaming", budget=24, window=6),
    CompressionConfig(method="h2o", budget=24, window=6),
    CompressionConfig(method="snapkv", budget=24, window=6),
    CompressionConfig(method="snapkv", budget=30, window=4, reuse=2),
    CompressionConfig(method="pyramidkv", budget=24, window=6),
    CompressionConfig(method="pyramidkv", keep=0.75, window=6, reuse=2),  # the leader keeps everything
    CompressionConfig(method="chunkkv", budget=24, window=6, chunk_size=4),
    CompressionConfig(method="chunkkv", budget=24, window=6, chunk_size=4, per_head=True),
    CompressionConfig(method="chunkkv", budget=30, window=4, chunk_size=5, per_head=True, reuse=3),
    CompressionConfig(method="fastgen", window=6, recovery=0.6, special_ids=tuple(range(8)),
                      punctuation_ids=tuple(range(8, 40))),
]


@pytest.mark.parametrize("config", DECODE_CONFIGS,
                         ids=lambda c: f"{c.method}{'-per-head' if c.per_head else ''}-r{c.reuse}")
def test_decode_attends_to_exactly_what_each_head_kept(config):
    model = tiny_model(n_layers=3)
    n_prompt, n_steps = 64, 6
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (2, n_prompt), generator=gen)
    forced = torch.randint(0, 256, (2, n_steps), generator=gen)
    budgets = config.layer_budgets(n_prompt, 3)
    _, captured = model.capture(prompt)
    logits = [prefill(model, prompt, config, n_steps + 1)]
    logits += [model.decode(forced[:, i:i + 1]) for i in range(n_steps)]
    logits = torch.stack(logits, dim=1)
    kept = kept_positions(model, n_prompt, per_head=config.per_kv_head)

    for layer, (cache, positions) in enumerate(zip(model.caches(), kept)):
        # the cache holds what the reference selects (a follower: from its leader's q and k)
        q, k, _ = captured[layer - layer % config.reuse]
        expected, margin = reference_keep(config, q, k, prompt, budgets[layer])
        assert margin > NEAR_TIE
        assert as_lists(positions, 2) == expected
        # a head may attend to its kept slots and the generated tokens, never to padding
        n = positions.shape[-1]
        used = positions >= 0 if positions.dim() == 3 else (positions >= 0)[:, None].expand(-1, 2, -1)
        assert torch.equal(cache.pos[..., :n] >= 0, used)
        assert cache.pos[..., n:n + n_steps].tolist() == [[list(range(n_prompt, n_prompt + n_steps))] * 2] * 2
        assert (cache.pos[..., n + n_steps:] == -1).all()

    reference = reference_logits(model, torch.cat([prompt, forced], 1), kept, n_prompt)[:, n_prompt - 1:]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # the test could tell a wrong cache from a right one: compression changed the output ...
    assert (logits[:, 1:] - model(torch.cat([prompt, forced], 1))[:, n_prompt:]).abs().max() > 1e-3
    if config.per_kv_head:  # ... and the KV heads of a layer kept different positions
        assert any(as_lists(p, 2)[b][0] != as_lists(p, 2)[b][1] for p in kept for b in range(2))
    if config.method == "fastgen":  # ... and some head has padding slots
        assert any((p == -1).any() for p in kept)


# ---------------------------------------------------------------------------------------
# Scoring upcasts: half-precision q/k score exactly as their float32 values do

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_equal_float32_scores_of_the_same_values(dtype):
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 4, 70, 16, generator=gen) * 3).to(dtype)
    k = (torch.randn(2, 2, 70, 16, generator=gen) * 3).to(dtype)
    q32, k32 = q.float(), k.float()
    for scores in (lambda q, k: chunkkv.window_scores(q[:, :, -8:], k),
                   lambda q, k: chunkkv.head_window_scores(q[:, :, -8:], k),
                   lambda q, k: chunkkv.snapkv_scores(q[:, :, -8:], k, 7),
                   lambda q, k: chunkkv.h2o_scores(q, k, block=32)):
        half = scores(q, k)
        assert half.dtype == torch.float32 and torch.equal(half, scores(q32, k32))
    tokens = torch.randint(0, 8, (2, 70), generator=gen)
    for method in ("h2o", "snapkv", "pyramidkv", "chunkkv", "chunkkv-per-head", "fastgen"):
        config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("-per-head"),
                                   budget=None if method == "fastgen" else 30, window=8, special_ids=(0,),
                                   punctuation_ids=(1,), recovery=0.5)
        half, _ = chunkkv.keep_positions(config, q, k, 30, layer=0, tokens=tokens)
        assert torch.equal(half, chunkkv.keep_positions(config, q32, k32, 30, layer=0, tokens=tokens)[0])


# ---------------------------------------------------------------------------------------
# Reuse: exactly the leaders score

@pytest.mark.parametrize("method", [m for m in chunkkv.SCORED if chunkkv.METHODS[m].scorer == "window"] + ["chunkkv-per-head"])
@pytest.mark.parametrize("n_layers, reuse, keep", [(5, 2, 0.3), (6, 3, 0.3), (4, 1, 0.3), (5, 2, 0.75), (4, 4, 0.9)])
def test_reuse_scores_in_exactly_the_leader_layers(method, n_layers, reuse, keep, monkeypatch):
    config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("-per-head"),
                               keep=None if method == "fastgen" else keep, window=5, reuse=reuse,
                               special_ids=(0,), punctuation_ids=(1, 2), recovery=0.5)
    scored, layer = [], []
    keep_positions, row = chunkkv.keep_positions, chunkkv.METHODS[config.method]
    monkeypatch.setattr(chunkkv, "keep_positions", lambda *args: layer.append(args[4]) or keep_positions(*args))
    monkeypatch.setitem(chunkkv.METHODS, config.method,
                        replace(row, score=lambda *args: scored.append(layer[-1]) or row.score(*args)))
    model = tiny_model(n_layers=n_layers)
    prompt = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    budgets = config.layer_budgets(100, n_layers)
    prefill(model, prompt, config, 2)
    assert layer == list(range(n_layers))
    assert scored == list(range(0, n_layers, reuse))
    if config.method == "pyramidkv" and keep == 0.75:
        assert budgets[0] == 100 > budgets[1]  # a leader that kept everything scored for its follower


def test_nothing_scores_when_every_budget_covers_the_prompt(monkeypatch):
    calls = []
    for method in ("h2o", "snapkv", "pyramidkv", "chunkkv"):
        row = chunkkv.METHODS[method]
        monkeypatch.setitem(chunkkv.METHODS, method, replace(row, score=lambda *args, row=row: calls.append(1)
                                                                or row.score(*args)))
    model = tiny_model(n_layers=4)
    prompt = torch.randint(0, 256, (1, 40))
    for method in ("h2o", "snapkv", "pyramidkv", "chunkkv"):
        prefill(model, prompt, CompressionConfig(method=method, budget=50, window=5, reuse=2), 2)
    assert calls == []


# ---------------------------------------------------------------------------------------
# Bad input: config, API, CLI

@pytest.mark.parametrize("kwargs, match", [
    (dict(pyramid_beta=0), "pyramid_beta must be a finite number of at least 1, got 0"),
    (dict(pyramid_beta=0.5), "pyramid_beta must be a finite number of at least 1, got 0.5"),
    (dict(pyramid_beta=-1), "pyramid_beta must be a finite number of at least 1, got -1"),
    (dict(pyramid_beta=math.nan), "pyramid_beta must be"),
    (dict(pyramid_beta=math.inf), "pyramid_beta must be"),
    (dict(n_sinks=0), "n_sinks must be at least 1, got 0"),
    (dict(n_sinks=-2), "n_sinks must be at least 1, got -2"),
    (dict(pool_kernel=6), "pool_kernel must be odd .* got 6: use 5 or 7"),
])
def test_bad_baseline_settings_are_clear_errors(kwargs, match):
    with pytest.raises(CompressionError, match=match):
        CompressionConfig(**kwargs)


def test_pyramid_beta_one_is_flat():  # the smallest beta allowed: every layer keeps the budget
    assert CompressionConfig(method="pyramidkv", budget=40, window=8, pyramid_beta=1).layer_budgets(100, 4) == [40] * 4


def test_generate_rejects_what_the_cli_rejects_with_the_same_message():
    cases = [(dict(max_new_tokens=0), ("--max-new-tokens", "0")),
             (dict(top_k=0), ("--top-k", "0")),
             (dict(temperature=-0.5), ("--temperature", "-0.5")),
             (dict(temperature=math.nan), ("--temperature", "nan"))]
    results = [cli(*case[1]) for case in cases]
    model = tiny_model()
    for (kwargs, _), result in zip(cases, results):
        with pytest.raises(PromptError) as error:
            generate(model, torch.zeros(1, 10, dtype=torch.long), CompressionConfig(method="full"), **kwargs)
        assert_user_error(result)
        assert result.stderr.strip() == f"error: {error.value}"


def test_a_tiny_temperature_samples_the_best_token():
    logits = torch.tensor([[30.0, 31.0, -5.0], [2.0, -1.0, 1.0]])
    for temperature in (1e-38, 1e-45):
        assert sample(logits, temperature, None).tolist() == [[1], [0]]
        assert sample(logits, temperature, 2).tolist() == [[1], [0]]


def test_cli_errors_for_the_remaining_bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cases = [
        (("--seed", "99999999999999999999999"), "--seed must be between 0 and 18446744073709551615"),
        (("--device", "meta"), "device meta holds no data", "use cpu"),
        (("--prompt", ""), "the prompt is empty"),
        (("--prompt-file", str(empty), "--chat"), "the prompt is empty"),
    ]
    for device in ("mps", "xpu"):
        if not getattr(torch, device).is_available():
            cases.append((("--device", device), f"device {device}, but this torch sees no {device} device",
                          "use cpu"))
    results = [cli(*case[0]) for case in cases]
    for (args, *fragments), result in zip(cases, results):
        assert_user_error(result, *fragments)


def test_cli_pyramidkv_keeps_what_it_is_asked_and_a_tiny_temperature_runs(tiny_dir):
    greedy, tiny = (cli("--checkpoint", str(tiny_dir), "--prompt", "z" * 208, "--no-chat", "--method", "pyramidkv",
                        "--keep", "0.75", "--max-new-tokens", "5", "--temperature", t) for t in ("0", "1e-38"))
    for result in (greedy, tiny):
        assert result.returncode == 0, result.stderr
        assert "KV kept per layer 104-208 of 208 (75.0 %), 2 layers" in result.stdout
    answer = lambda result: result.stdout.split("--- answer ---")[1].split("\n---")[0]  # noqa: E731
    assert answer(tiny) == answer(greedy)  # 1e-38 samples the greedy tokens: no overflow to nan


# ---------------------------------------------------------------------------------------
# Streaming output and the summary

def emoji_cutting_tokenizer() -> Tokenizer:
    """Byte-level BPE with one merge, space + the first byte of a 4-byte character, as real
    vocabularies have: " 😀" is 4 tokens, the space sharing the first."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġð"] = len(vocab)  # byte-level spellings of 0x20 and 0xF0
    tokenizer = Tokenizer(models.BPE(vocab, [("Ġ", "ð")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_stream_flushes_the_text_held_back_before_a_cut_character(capsys):
    tokenizer = emoji_cutting_tokenizer()
    ids = tokenizer.encode("ok 😀").ids
    assert len(ids) == 6  # o, k, space + first byte, three more bytes
    stream = TextStream(tokenizer)
    for i in ids[:-1]:  # generation ends one token short of the emoji
        stream(torch.tensor([[i]]))
    assert capsys.readouterr().out == "ok"  # the space and the cut character wait for more bytes
    stream.flush()
    assert capsys.readouterr().out == " \ufffd"
    assert stream.printed == tokenizer.decode(ids[:-1])
    whole = TextStream(tokenizer)
    for i in ids:
        whole(torch.tensor([[i]]))
    whole.flush()
    assert capsys.readouterr().out == "ok 😀"


def test_stream_prints_nothing_past_a_stop_token(capsys):
    """decode_tokens reads stops every few steps, so on_token may see stop tokens after the first."""
    tokenizer = emoji_cutting_tokenizer()
    ids = tokenizer.encode("ok 😀").ids
    stream = TextStream(tokenizer, stop_ids=(ids[1],))  # "k", a token with text: shown, then nothing
    for i in ids + [ids[1]] * 3:
        stream(torch.tensor([[i]]))
    stream.flush()
    assert capsys.readouterr().out == "ok" and stream.ids == ids[:2]


def test_cli_prints_the_held_back_text_at_the_end(tiny_dir, monkeypatch, capsys):
    cut = byte_tokenizer().encode(" 😀").ids[:-1]  # the tiny checkpoint's tokenizer: one token per byte
    real_generate = cli_module.generate

    def generate_ending_in_a_cut_emoji(*args, on_token, **kwargs):
        record = real_generate(*args, **kwargs)
        for i in cut:
            on_token(torch.tensor([[i]]))
        return record

    monkeypatch.setattr(cli_module, "generate", generate_ending_in_a_cut_emoji)
    assert cli_module.main(["--checkpoint", str(tiny_dir), "--prompt", "z" * 50, "--method", "full",
                            "--max-new-tokens", "2"]) == 0
    answer = capsys.readouterr().out.split("--- answer ---\n")[1].split("\n---")[0]
    assert answer == " \ufffd"


def test_question_answers_print_the_held_back_text_at_the_end(tiny_dir, monkeypatch, capsys, tmp_path):
    cut = byte_tokenizer().encode(" 😀").ids[:-1]
    real_answer = cli_module.answer

    def answer_ending_in_a_cut_emoji(*args, on_token, **kwargs):
        record = real_answer(*args, **kwargs)
        for i in cut:
            on_token(torch.tensor([[i]]))
        return record

    monkeypatch.setattr(cli_module, "answer", answer_ending_in_a_cut_emoji)
    context = tmp_path / "context.txt"
    context.write_text("z" * 50)
    assert cli_module.main(["--checkpoint", str(tiny_dir), "--context-file", str(context), "--question", "q?",
                            "--question", "r?", "--method", "full", "--max-new-tokens", "2"]) == 0
    answers = capsys.readouterr().out.split("\n---\n")[0].split(" ---\n")[1:]
    assert [a.split("\n")[0] for a in answers] == [" \ufffd", " \ufffd"]


def test_summary_names_only_the_settings_a_method_uses():
    prefilled = Prefilled(lengths=[200], budgets=[[20, 20]], kept=[[20.0, 20.0]], prefill_seconds=0.1,
                          compress_seconds=0.01, kv_bytes=2**17, kv_bytes_full=2**20)
    method_line = lambda config: summary(config, 2, prefilled, 2, [0.1, 0.1]).splitlines()[0]  # noqa: E731
    assert method_line(CompressionConfig(method="streaming", budget=40)) == "method            streaming (4 sinks)"
    assert method_line(CompressionConfig(method="full")) == "method            full"
    assert method_line(CompressionConfig(budget=40, reuse=2)) == \
        "method            chunkkv (chunk 10, window 32, reuse 2)"
    assert method_line(CompressionConfig(method="snapkv", budget=40)) == "method            snapkv (window 32, reuse 1)"
