"""chunkkv.py's API for hosts that keep the top-k of a score and ask any budget (kvpress, a plain
transformers cache): per-token keep priorities whose top-k is each method's selection for every
budget, the host rule for budgets of the window or less, scorers that take any number of queries,
FastGen as a boolean mask, and `tokens` needed only where FastGen reads token ids. Oracles: the
plain-Python selections (conftest.reference_select and the ones below) and a dense attention matrix."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkkv
from chunkkv import CompressionConfig, CompressionError
from conftest import reference_select


def reference_tokens(scores: list[float], budget: int, window: int) -> list[int]:
    """Token-level selection in plain Python: the best budget - window prefix tokens (ties: earlier
    first) and the window; a budget of the window or less keeps the last `budget` tokens."""
    n_prompt = len(scores)
    if n_prompt <= budget:
        return list(range(n_prompt))
    if budget <= window:
        return list(range(n_prompt - budget, n_prompt))
    ranked = sorted(range(n_prompt - window), key=lambda p: (-scores[p], p))
    return sorted(ranked[:budget - window] + list(range(n_prompt - window, n_prompt)))


@st.composite
def any_budget_case(draw):
    """Scores with ties, any window (also longer than the prompt) and every budget from 0 past T."""
    n_prompt = draw(st.integers(1, 120))
    scores = draw(st.lists(st.integers(0, 5), min_size=n_prompt, max_size=n_prompt))
    return scores, draw(st.integers(1, 40)), draw(st.integers(1, 16))


@settings(max_examples=200, deadline=None)
@given(any_budget_case())
def test_the_top_k_of_chunk_priority_is_chunkkv_for_every_budget(case):
    scores, window, chunk_size = case
    priority = chunkkv.chunk_priority(torch.tensor([scores], dtype=torch.float32), window, chunk_size)[0]
    assert len(set(priority.tolist())) == len(scores)  # unique: a top-k has no ties to break
    for budget in range(len(scores) + 3):
        top = sorted(priority.topk(min(budget, len(scores))).indices.tolist())  # what any host's top-k keeps
        assert top == reference_select(scores, budget, window, chunk_size), budget


@settings(max_examples=200, deadline=None)
@given(any_budget_case())
def test_the_top_k_of_token_priority_is_the_token_selection_for_every_budget(case):
    scores, window, _ = case
    priority = chunkkv.token_priority(torch.tensor([scores], dtype=torch.float32), window)[0]
    for budget in range(len(scores) + 3):
        assert sorted(priority.topk(min(budget, len(scores))).indices.tolist()) == reference_tokens(scores, budget, window)
        assert chunkkv.select_tokens(torch.tensor([scores], dtype=torch.float32), budget, window)[0].tolist() == \
            reference_tokens(scores, budget, window)


@given(st.integers(1, 80), st.integers(1, 8))
def test_the_top_k_of_streaming_priority_is_sinks_then_the_latest(n_prompt, n_sinks):
    priority = chunkkv.streaming_priority(n_prompt, n_sinks)
    for budget in range(n_prompt + 2):
        kept = sorted(priority.topk(min(budget, n_prompt)).indices.tolist())
        sinks = list(range(min(budget, n_sinks, n_prompt)))
        recent = list(range(max(len(sinks), n_prompt - (budget - len(sinks))), n_prompt))
        assert kept == sinks + recent


def test_priorities_are_batched_per_row_and_head():
    scores = torch.rand(3, 2, 90, generator=torch.Generator().manual_seed(0))
    priority = chunkkv.chunk_priority(scores, 8, 5)
    for row in range(3):
        for head in range(2):
            assert torch.equal(priority[row, head], chunkkv.chunk_priority(scores[row, head][None], 8, 5)[0])


def test_the_host_rule_never_refuses_and_keeps_the_last_tokens():
    """chunkkv's own runs refuse a budget with no room beside the window; a host config keeps the
    last `budget` tokens instead (kvpress asks e.g. 1 of 5 tokens at compression_ratio 0.8)."""
    with pytest.raises(CompressionError, match="leaves no room"):
        CompressionConfig("chunkkv", budget=20)
    with pytest.raises(CompressionError, match="fewer than the observation window"):
        CompressionConfig("chunkkv", keep=0.1).prompt_budget(100)
    for method in ("chunkkv", "snapkv", "h2o", "pyramidkv"):
        config = CompressionConfig(method, budget=20, host=True)
        assert config.prompt_budget(100) == 20 and config.layer_budgets(100, 3) == [20, 20, 20]  # flat pyramid
        assert CompressionConfig(method, budget=1, host=True).prompt_budget(5) == 1  # within the window too
        q, k = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8)
        kept, _ = chunkkv.keep_positions(config, q, k, 20, layer=0)
        assert (kept == torch.arange(80, 100)).all()
    streaming = CompressionConfig("streaming", budget=3, host=True)
    assert chunkkv.keep_positions(streaming, None, torch.zeros(1, 2, 50, 8), 3, layer=0)[0].tolist() == [[0, 1, 2]]
    assert CompressionConfig("fastgen", budget=7, host=True).prompt_budget(50) == 50  # chooses its own count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 40), st.data(), st.integers(0, 2**31 - 1))
def test_h2o_scores_take_any_number_of_queries(n_batch, n_prompt, data, seed):
    """The last n of T queries (a host that projected only those): their causal attention summed
    over queries, averaged over each group, as a dense T x T matrix gives it."""
    n_queries = data.draw(st.integers(1, n_prompt))
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n_batch, 4, n_prompt, 8, generator=gen) * 2, torch.randn(n_batch, 2, n_prompt, 8, generator=gen) * 2
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 8 ** 0.5  # [B, Hq, T, T]
    attention = logits.masked_fill(~torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    naive = attention[:, :, -n_queries:].sum(dim=2).view(n_batch, 2, 2, n_prompt).mean(dim=2)
    got = chunkkv.h2o_scores(q[:, :, -n_queries:], k, block=data.draw(st.integers(1, 16)))
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [m for m in chunkkv.SCORED if chunkkv.METHODS[m].scorer == "window"])
@pytest.mark.parametrize("n_queries", [1, 5, 32, 60])
def test_every_scorer_takes_any_number_of_queries(method, n_queries):
    config = CompressionConfig(method, window=32)
    q, k = torch.randn(2, 4, n_queries, 8), torch.randn(2, 2, 60, 8)
    scores = config.row.score(config, q, k)
    assert scores.shape[-1] == 60 and torch.isfinite(scores).all()


def test_fastgen_as_a_boolean_mask_and_tokens_only_for_token_ids():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 2, 70, generator=gen)
    tokens = torch.randint(0, 8, (2, 70), generator=gen)
    config = CompressionConfig("fastgen", window=8, recovery=0.5, special_ids=(0,), punctuation_ids=(1,))
    keep = chunkkv.fastgen_mask(scores, tokens, config)  # [B, Hkv, T] bool
    positions = chunkkv.mask_positions(chunkkv.fastgen_mask(scores, tokens, config))
    for row in range(2):
        for head in range(2):
            assert keep[row, head].nonzero().flatten().tolist() == [p for p in positions[row, head].tolist() if p >= 0]
    assert keep[..., -8:].all()  # the window
    no_ids = CompressionConfig("fastgen", window=8, recovery=0.5)
    assert torch.equal(chunkkv.fastgen_mask(scores, None, no_ids), chunkkv.fastgen_mask(scores, tokens, no_ids))
    with pytest.raises(CompressionError, match="pass tokens"):
        chunkkv.keep_positions(config, torch.randn(2, 4, 70, 8), torch.randn(2, 2, 70, 8), 70, layer=0)
    assert chunkkv.keep_positions(no_ids, torch.randn(2, 4, 70, 8), torch.randn(2, 2, 70, 8), 70, layer=0)[0].dim() == 3


def test_selectors_need_no_tokens():
    k = torch.randn(1, 2, 50, 8)
    for name, row in [(n, r) for n, r in chunkkv.METHODS.items() if r.scorer == "window"]:  # kvzip: test_reconstruct
        config = CompressionConfig(name)
        scores = None if row.score is None else row.score(config, torch.randn(1, 4, 50, 8), k)
        assert row.select(config, scores, 40, k).shape[-1] <= 50  # no tokens argument
