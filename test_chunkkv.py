"""The core's tests: hypothesis properties of selection, budgets and reuse against plain-Python
references; tiny random models for the cache mechanics and the compiled step. The rest of the
suite is in tests/; its shared fixtures and references in conftest.py."""
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkkv
import cli
from chunkkv import CompressionConfig, CompressionError
from conftest import greedy, kept_positions, prefill, reference_logits, reference_select, run_forced, tiny_model
from generate import compile_decode, generate
from model import CacheRequest, PromptError

torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------
# Selection and budgets

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
    assert CompressionConfig(method="full", window=window).prompt_budget(n_prompt) == n_prompt


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="h2"), "unknown method"),
    (dict(keep=0.0), "keep must be in"),
    (dict(keep=1.5), "keep must be in"),
    (dict(budget=32), "at least 33"),
    (dict(keep=0.2, budget=40), "not both"),
    (dict(method="full", keep=0.2), "full keeps every entry"),
    (dict(method="fastgen", budget=40), "fastgen chooses each head's budget itself"),
    (dict(method="snapkv", per_head=True), "for chunkkv only"),
    (dict(method="streaming", budget=4), "at least 5"),
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
    method = draw(st.sampled_from(tuple(m for m, r in chunkkv.METHODS.items() if r.scorer == "window") + ("chunkkv-per-head",)))
    window = draw(st.integers(5, 10))
    n_prompt = draw(st.integers(1, 90))
    budget = draw(st.integers(window + 1, max(window + 1, n_prompt + 5)))
    config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("per-head"),
                               budget=budget if chunkkv.METHODS[method.removesuffix("-per-head")].budgeted else None,
                               window=window, chunk_size=draw(st.integers(1, 12)),
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
    positions, _ = chunkkv.keep_positions(config, q, k, budget, layer=1, tokens=tokens)
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
        alone, _ = chunkkv.keep_positions(config, q[b:b + 1], k[b:b + 1], budget, layer=1, tokens=tokens[b:b + 1])
        assert [[p for p in r if p >= 0] for r in alone[0].reshape(-1, alone.shape[-1]).tolist()] == \
            [[p for p in r if p >= 0] for r in positions[b].reshape(-1, positions.shape[-1]).tolist()]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(33, 3000), st.integers(1, 32), st.floats(1.0, 50.0))
def test_pyramid_budgets(n_layers, budget, window, beta):
    budgets = chunkkv.pyramid_budgets(budget, window, n_layers, beta, n_prompt=10 * budget)  # the plain line
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
    for kept, cache, budget in zip(kept_positions(model, 200, per_head=True), model.caches(), budgets):
        assert kept.shape == (1, 2, budget)
        assert cache.k.shape[2] == -(-(budget + 4) // 8) * 8


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
        kept[recovery] = (chunkkv.mask_positions(chunkkv.fastgen_mask(scores, tokens, config)) >= 0).sum(-1)
    assert (kept[high] >= kept[low]).all()  # a higher threshold never keeps fewer tokens
    assert (kept[1.0] == n_prompt).all()  # threshold 1.0 keeps everything


# ---------------------------------------------------------------------------------------
# Tiny random models: cache mechanics

def test_budget_covering_the_prompt_is_the_full_cache():
    model = tiny_model()
    prompt, forced = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 12))
    full_forward = model(torch.cat([prompt, forced], 1))[:, 39:]
    configs = [CompressionConfig(method=method, budget=budget, window=8, reuse=reuse)
               for method, row in chunkkv.METHODS.items() if row.budgeted and row.scorer == "window" for budget, reuse in [(40, 1), (500, 2)]]
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
    kept = kept_positions(model, 64)
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
    direct_kept = kept_positions(model, 70, per_head=True)
    first, captured = model.capture(prompt)
    scores = [config.row.score(config, q, k) for q, k, _ in captured]
    budgets = [config.layer_budgets(70, 3)] * 2
    for precomputed in (None, scores):
        model.compress(captured, CacheRequest(config, [70, 70], budgets, 7, scores=precomputed))
        assert all(torch.equal(a, b) for a, b in zip(kept_positions(model, 70, per_head=True), direct_kept))
        logits = [first] + [model.decode(forced[:, i:i + 1]) for i in range(6)]
        torch.testing.assert_close(torch.stack(logits, 1), direct, rtol=1e-5, atol=1e-5)


def test_cache_holds_one_entry_per_kv_head():
    model = tiny_model()
    run_forced(model, torch.randint(0, 256, (3, 50)), CompressionConfig(budget=20, window=4), torch.zeros(3, 5, dtype=torch.long))
    cache = model.caches()[0]
    assert cache.k.shape == (3, model.args.n_kv_heads, 32, model.args.head_dim)  # 20 + 5 + 1 -> 32 slots
    assert cache.used.tolist() == [25] * 3 and cache.length.tolist() == [55] * 3  # 20 kept + 5 decoded; 50 + 5
    assert kept_positions(model, 50, per_head=True)[0].shape == (3, model.args.n_kv_heads, 20)


def test_batch_rows_match_their_batch_of_one_runs():
    model = tiny_model(n_layers=3)
    prompts, forced = torch.randint(0, 256, (2, 80)), torch.randint(0, 256, (2, 16))
    config = CompressionConfig(budget=30, window=6, chunk_size=5)
    batch = run_forced(model, prompts, config, forced)
    batch_kept = kept_positions(model, 80)
    for row in range(2):
        single = run_forced(model, prompts[row:row + 1], config, forced[row:row + 1])
        torch.testing.assert_close(batch[row:row + 1], single, rtol=1e-5, atol=1e-5)
        for layer, kept in enumerate(kept_positions(model, 80)):
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
    reused = kept_positions(model, 60)
    assert len(calls) == len(range(0, n_layers, reuse))  # only leaders score
    run_forced(model, prompt, CompressionConfig(budget=25, window=5, chunk_size=4, reuse=1), prompt[:, :0])
    own = kept_positions(model, 60)
    for layer in range(n_layers):
        leader = layer - layer % reuse
        assert torch.equal(reused[layer], reused[leader])  # groups identical
        assert torch.equal(reused[leader], own[leader])  # leaders computed their own choice


@pytest.mark.parametrize("method", [m for m in chunkkv.SCORED if chunkkv.METHODS[m].scorer == "window"] + ["chunkkv-per-head"])
def test_reuse_skips_scoring_for_every_scored_method(method, monkeypatch):
    config = CompressionConfig(method=method.removesuffix("-per-head"), per_head=method.endswith("per-head"),
                               budget=None if method == "fastgen" else 40, window=5, reuse=2, special_ids=(0,),
                               punctuation_ids=(1, 2), recovery=0.5)
    model = tiny_model(n_layers=4)
    calls = []
    row = chunkkv.METHODS[config.method]
    monkeypatch.setitem(chunkkv.METHODS, config.method,
                        replace(row, score=lambda *args: calls.append(1) or row.score(*args)))
    run_forced(model, torch.randint(0, 256, (2, 120)), config, torch.zeros(2, 2, dtype=torch.long))
    assert len(calls) == 2  # layers 0 and 2 score, 1 and 3 reuse
    kept = kept_positions(model, 120, per_head=True)
    for leader, follower in [(0, 1), (2, 3)]:
        if config.method == "pyramidkv":  # a deeper layer re-selects from its leader's scores with its smaller budget
            for a, b in zip(kept[leader].flatten(0, 1).tolist(), kept[follower].flatten(0, 1).tolist()):
                assert len(b) < len(a) and set(b) <= set(a)
        else:
            assert torch.equal(kept[leader], kept[follower])


def test_generate_rejects_a_prompt_longer_than_the_context():
    model = tiny_model(max_seq_len=64)
    with pytest.raises(PromptError, match="exceeds the model's context of 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), CompressionConfig(method="full"), max_new_tokens=5)


def greedy_decode(model, prompt, config, decode, n_steps=32, n_slots=128):
    """Greedy tokens and decode logits with a given decode step, in a cache of fixed size."""
    return greedy(model, prefill(model, prompt, config, n_steps, n_slots=n_slots), n_steps, decode)


@pytest.mark.parametrize("n_batch", [1, 2])  # one row reads the weights in a fused multiply-and-sum (model.Linear)
def test_compiled_decode_is_one_graph_for_every_prompt_and_method(n_batch):
    torch._dynamo.reset()
    model = tiny_model()
    compiled = compile_decode(model)  # fullgraph=True: a graph break would raise
    prompt = torch.randint(0, 256, (n_batch, 50))
    config = CompressionConfig(budget=20, window=4)
    eager_tokens, eager_logits = greedy_decode(model, prompt, config, model.decode)
    tokens, logits = greedy_decode(model, prompt, config, compiled)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompile is an error from here on
        for n_prompt, config in [(90, CompressionConfig(method="snapkv", budget=30, window=4)),
                                 (31, CompressionConfig(method="full")),
                                 (70, CompressionConfig(method="fastgen", window=4, special_ids=(0,)))]:
            prompt = torch.randint(0, 256, (n_batch, n_prompt))
            tokens, logits = greedy_decode(model, prompt, config, compiled)
            assert torch.equal(tokens, greedy_decode(model, prompt, config, model.decode)[0])


def test_one_compiled_step_serves_twenty_prompt_lengths_and_three_batch_sizes():
    """Every cache size was a new graph (the cache's buffers were new tensors, and Dynamo guards on
    their identity), so the 9th size raised at the recompile limit (fullgraph): now a few graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    compiled = compile_decode(model)
    for i, n_prompt in enumerate(range(80, 340, 13)):
        prompt, config = torch.randint(0, 256, (1 + i % 3, n_prompt)), CompressionConfig(keep=0.5)
        tokens = generate(model, prompt, config, max_new_tokens=4, decode=compiled).tokens
        assert torch.equal(tokens, generate(model, prompt, config, max_new_tokens=4).tokens), n_prompt
    assert counters["stats"]["unique_graphs"] <= 3


def test_the_compiled_step_compiles_once_more_past_4096_cache_slots():
    """The slots are dynamic from the first graph on the CPU, so the graph Inductor caches for the next process
    serves any cache size there (a static first graph was a new compile per size) up to 4,096 slots: past them
    Inductor sums the softmax in chunks and guards on it, one more graph (docs/results.md, Speed) for every larger."""
    torch._dynamo.reset()
    model, prompt, full = tiny_model(), torch.randint(0, 256, (1, 40)), CompressionConfig(method="full")
    compiled = compile_decode(model)
    for n_slots, stance in [(64, "default"), (4000, "fail_on_recompile"), (4200, "default"), (9000, "fail_on_recompile")]:
        with torch.compiler.set_stance(stance):
            tokens = generate(model, prompt, full, max_new_tokens=4, decode=compiled, n_slots=n_slots).tokens
        assert torch.equal(tokens, generate(model, prompt, full, max_new_tokens=4, n_slots=n_slots).tokens)


def test_decode_speed_leaves_out_the_steps_that_compiled_or_recorded_a_graph():
    """Under CUDA graphs the step after the compile records the graph, so dropping only the first
    step counted the recording as decoding. A step during which Dynamo compiled or a CUDA graph was
    recorded (both announce it through Dynamo's start callbacks: convert_frame and cudagraph_trees'
    record_function) is warm-up; the recording is played here as cudagraph_trees announces it."""
    from torch._dynamo.callback import CallbackTrigger

    torch._dynamo.reset()
    model, config = tiny_model(), CompressionConfig(budget=20, window=4)
    prompt = torch.randint(0, 256, (1, 40))
    eager = generate(model, prompt, config, 6)
    assert eager.warmup_seconds == [] and len(eager.step_seconds) == 5  # 6 tokens take 5 steps
    compiled = compile_decode(model)
    first, again = (generate(model, prompt, config, 6, decode=compiled) for _ in range(2))
    assert len(first.warmup_seconds) == 1 and len(first.step_seconds) == 4  # the first step compiled
    assert again.warmup_seconds == [] and len(again.step_seconds) == 5

    calls = []

    def recording_step(token):  # a CUDA-graph step: compiled on call 1, recorded on call 2
        calls.append(token)
        if len(calls) <= 2:
            trigger = CallbackTrigger.DYNAMO if len(calls) == 1 else CallbackTrigger.CUDAGRAPH_RECORDING
            with torch._dynamo.callback_handler.install_callbacks(trigger, "0/0"):
                pass
        return model.decode(token)
    record = generate(model, prompt, config, 6, decode=recording_step)
    assert len(record.warmup_seconds) == 2 and len(record.step_seconds) == 3
    line = cli.record_summary(record, config, 2).splitlines()[-1]
    assert f"{3 / sum(record.step_seconds):.1f} tokens/s (warm-up, left out: 2 steps" in line


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_native_bfloat16(monkeypatch):
    from devices import auto_dtype

    for capability, expected in [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # T4, A100, H100
        assert auto_dtype(torch.device("cuda")) == expected
    for avx512_bf16, amx, expected in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert auto_dtype(torch.device("cpu")) == expected


def test_a_prefill_only_the_math_kernel_runs_is_refused_when_its_scores_do_not_fit(monkeypatch):
    """On a GPU with no fused SDPA kernel for the dtype (float16 below compute capability 8.0), the
    prefill's attention is the math kernel's: 8 bytes per score of [B, Hq, T, T] (float32 scores and
    softmax). It is refused before the prefill when that passes the free memory; CPU's kernel tiles.
    The kernel probe (torch.backends.cuda.can_use_*) needs a GPU: here it is played by the patch."""
    import model as model_module

    model = tiny_model()  # 4 query heads
    assert model_module.fused_attention(2, model.args, model.lm_head.weight)  # CPU: never the math kernel
    monkeypatch.setattr(model_module, "fused_attention", lambda n_batch, args, weight: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 20, 16 * 2 ** 30))  # 1 MiB free
    fits = 8 * 4 * 2 * 128 ** 2  # 1 MiB exactly: 2 prompts of 128 tokens
    assert fits == 2 ** 20
    generate(model, torch.randint(0, 256, (2, 128)), CompressionConfig(method="full"), max_new_tokens=2)
    with pytest.raises(PromptError, match=r"attention over 2 x 129 prompt tokens needs 0.0 GiB, 0.0 GiB are free "
                                          r"\(only SDPA's math kernel .*: shorten the prompt or batch fewer prompts"):
        generate(model, torch.randint(0, 256, (2, 129)), CompressionConfig(method="full"), max_new_tokens=2)


@pytest.mark.parametrize("n_batch", [1, 2])
def test_compiled_decode_matches_eager_in_bfloat16(n_batch):
    """--dtype auto picks bfloat16 on CPUs with native bf16: the compiled step (batch 1: fused
    multiply-and-sums; more rows: frozen, autotuned GEMMs) must agree with eager there too (to bf16
    round-off: the products sum in another order)."""
    torch._dynamo.reset()
    model = tiny_model().to(torch.bfloat16)
    compiled = compile_decode(model)
    prompt = torch.randint(0, 256, (n_batch, 50))
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
        request = CacheRequest(config, [n_prompt], [config.layer_budgets(n_prompt, 2)], 4)
        eager = model.prefill(prompt, request)[0]
        eager_kept = kept_positions(model, n_prompt)
        torch.testing.assert_close(compiled(prompt, request)[0], eager, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(kept_positions(model, n_prompt), eager_kept))




def test_streaming_needs_no_room_beside_a_window_it_does_not_keep():
    config = CompressionConfig(method="streaming", budget=20)  # below the default window of 32: it has no window
    assert config.prompt_budget(100) == 20 and config.min_budget == 5
    kept = chunkkv.keep_positions(config, torch.zeros(1, 4, 100, 8), torch.zeros(1, 2, 100, 8), 20, layer=0)[0]
    assert kept[0].tolist() == list(range(4)) + list(range(84, 100))
    with pytest.raises(CompressionError, match="the 4 attention sinks"):
        CompressionConfig(method="streaming", budget=4)


def test_a_method_is_one_table_row(monkeypatch):
    """Adding a variant is one row of chunkkv.METHODS and nothing else: SnapKV's pooled scores with
    ChunkKV's whole chunks, per KV head, runs through the model and keeps what its row says."""
    row = chunkkv.Method(chunkkv.pooled_window_score,
                         lambda c, s, budget, k, t: chunkkv.select_chunks(s, budget, c.window, c.chunk_size),
                         per_head=True, recompressible=True)
    monkeypatch.setitem(chunkkv.METHODS, "snapkv-chunks", row)
    config = CompressionConfig(method="snapkv-chunks", budget=24, window=4, chunk_size=5)
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 60))
    record = generate(model, prompt, config, max_new_tokens=3)
    _, captured = model.capture(prompt)
    for (q, k, _), kept in zip(captured, kept_positions(model, 60, per_head=True)):
        scores = chunkkv.snapkv_scores(q[:, :, -4:], k, config.pool_kernel)
        assert torch.equal(kept, chunkkv.select_chunks(scores, 24, 4, 5))
    assert record.prefill.kept == [[24.0, 24.0]] * 2
