"""Query-agnostic scoring by reconstruction (KVzip): a teacher-forced repeat of the context, block by
block, attends to it, and any selector keeps what those scores rank first. Oracles: a plain-loop
softmax over each repeat query's visible keys, and a whole-sequence forward (model.capture of the
context followed by the repeat) in place of the cache and extend."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkkv
from chunkkv import CompressionConfig, CompressionError
from conftest import tiny_model
from contexts import Repeat, reconstruction_scores
from generate import answer, compress_context
from model import CacheRequest

REPEAT = Repeat(first=[1, 2, 3], later=[4, 5], suffix=[6], start=2, block=40)


def reference_scores(q, k, start: int, end: int, n_context: int, n_sinks: int) -> list:
    """chunkkv.reconstruction_scores in loops: for each KV head, the max over its query heads and the
    repeat queries of the softmax over [sinks, the block, the repeat's own keys up to the query]."""
    n_batch, n_heads, n_repeat, head_dim = q.shape
    n_kv_heads, group, sink = k.shape[1], n_heads // k.shape[1], min(n_sinks, start)
    out = [[[0.0] * (end - start) for _ in range(n_kv_heads)] for _ in range(n_batch)]
    for b in range(n_batch):
        for h in range(n_heads):
            for r in range(n_repeat):
                keys = list(range(sink)) + list(range(start, end)) + [n_context + j for j in range(r + 1)]
                logits = [float(q[b, h, r].double() @ k[b, h // group, j].double()) / math.sqrt(head_dim) for j in keys]
                top = max(logits)
                total = sum(math.exp(x - top) for x in logits)
                for i, p in enumerate(range(start, end)):
                    prob = math.exp(logits[sink + i] - top) / total
                    out[b][h // group][p - start] = max(out[b][h // group][p - start], prob)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 30), st.integers(1, 12),
       st.integers(0, 6), st.data())
def test_reconstruction_scores_equal_a_plain_loop(n_batch, n_kv_heads, group, n_context, n_repeat, n_sinks, data):
    start = data.draw(st.integers(0, n_context - 1))
    end = data.draw(st.integers(start + 1, n_context))
    block = data.draw(st.integers(1, 8))  # query blocks: any split gives the same max
    q = torch.randn(n_batch, n_kv_heads * group, n_repeat, 8)
    k = torch.randn(n_batch, n_kv_heads, n_context + n_repeat, 8)
    own_lse = None
    if data.draw(st.booleans()):  # the repeat's own keys' log-sum-exps, as its attention would find them
        logits = q @ k[:, :, n_context:].repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(8)
        own_lse = logits.masked_fill(~torch.ones(n_repeat, n_repeat, dtype=torch.bool).tril(), -math.inf).logsumexp(-1)
    got = chunkkv.reconstruction_scores(q, k, start, end, n_context, n_sinks, block, own_lse)
    torch.testing.assert_close(got, torch.tensor(reference_scores(q, k, start, end, n_context, n_sinks)),
                               rtol=1e-5, atol=1e-6)


def test_the_repeat_prompts_follow_kvzip():
    """Block 1 after the first prompt; later blocks after the second and the previous block's last 8
    tokens; then the suffix and the block. Tokens before `start` are never repeated."""
    ids = list(range(100, 200))
    prompts = REPEAT.prompts(ids)
    assert [(s, e) for s, e, _ in prompts] == [(2, 42), (42, 82), (82, 100)]
    assert prompts[0][2] == [1, 2, 3, 6] + ids[2:42]
    assert prompts[1][2] == [4, 5] + ids[34:42] + [6] + ids[42:82]
    assert prompts[2][2] == [4, 5] + ids[74:82] + [6] + ids[82:100]


def full_prefill(model, tokens, room):
    n_batch, n_context = tokens.shape
    model.prefill(tokens, CacheRequest(CompressionConfig(method="full"), [n_context] * n_batch,
                                       [[n_context] * model.args.n_layers] * n_batch, room))


def test_scores_equal_a_whole_sequence_forward_and_the_cache_is_rolled_back_bit_for_bit():
    """Each block's scores from the cache (prefill + extend of the repeat) equal those from one forward
    over the context followed by that repeat (model.capture, no cache), and afterwards the caches hold
    exactly what the prefill left: K, V and positions of every slot, and the counters."""
    model, n_sinks = tiny_model(), 4
    tokens = torch.randint(0, 256, (2, 100))
    full_prefill(model, tokens, 60)
    before = [{name: getattr(c, name).clone() for name in ("k", "v", "pos", "used", "length")} for c in model.caches()]
    scores = reconstruction_scores(model, tokens, REPEAT, n_sinks)
    for cache, saved in zip(model.caches(), before):
        assert torch.equal(cache.pos, saved["pos"]) and torch.equal(cache.used, saved["used"])
        assert torch.equal(cache.length, saved["length"])
        assert torch.equal(cache.k[:, :, :100], saved["k"][:, :, :100]) and torch.equal(cache.v[:, :, :100], saved["v"][:, :, :100])
    for start, end, _ in REPEAT.prompts(tokens[0].tolist()):
        repeats = torch.tensor([REPEAT.prompts(row)[[s for s, _, _ in REPEAT.prompts(row)].index(start)][2]
                                for row in tokens.tolist()])
        _, captured = model.capture(torch.cat([tokens, repeats], dim=1))
        for layer, (q, k, _) in enumerate(captured):
            expected = chunkkv.reconstruction_scores(q[:, :, 100:], k, start, end, 100, n_sinks)
            sinks = max(0, n_sinks - start)  # +inf in the scores: the sinks are always kept
            torch.testing.assert_close(scores[layer][..., start + sinks:end], expected[..., sinks:], rtol=1e-4, atol=1e-6)
    for layer_scores in scores:
        assert torch.isinf(layer_scores[..., :n_sinks]).all() and (layer_scores[..., n_sinks:2] == 0).all()


@pytest.mark.parametrize("kwargs", [dict(method="kvzip"), dict(scorer="reconstruct"), dict(scorer="reconstruct", per_head=True),
                                    dict(method="snapkv", scorer="reconstruct"), dict(method="h2o", scorer="reconstruct"),
                                    dict(method="pyramidkv", scorer="reconstruct"), dict(method="eg-chunkkv", scorer="reconstruct"),
                                    dict(method="kvzip", global_budget=True),
                                    dict(scorer="reconstruct", global_budget=True)])
def test_a_budget_covering_the_context_gives_the_full_caches_answer_on_the_reconstruct_scorer(kwargs):
    model = tiny_model()
    context, question = torch.randint(0, 256, (2, 90)), torch.randint(0, 256, (2, 5))
    full = answer(model, compress_context(model, context, CompressionConfig(method="full"), 16), question, 8).tokens
    compressed = compress_context(model, context, CompressionConfig(budget=90, window=4, **kwargs), 16, repeat=REPEAT)
    assert torch.equal(answer(model, compressed, question, 8).tokens, full)


def test_each_selector_keeps_the_top_of_the_reconstruction_scores():
    """kvzip: each KV head's best tokens, the sinks first, no window; chunkkv on the reconstruct scorer:
    whole chunks of the scores summed over the KV heads, and the window."""
    model = tiny_model()
    context = torch.randint(0, 256, (1, 100))
    full_prefill(model, context, 60)
    scores = reconstruction_scores(model, context, REPEAT, 4)
    for config, expected in [
            (CompressionConfig(method="kvzip", budget=30), [chunkkv.select_tokens(s, 30, 0) for s in scores]),
            (CompressionConfig(budget=30, window=4, scorer="reconstruct"),
             [chunkkv.select_chunks(s.sum(1), 30, 4, 10)[:, None].expand(-1, 2, -1) for s in scores])]:
        compress_context(model, context, config, 16, repeat=REPEAT)
        for cache, kept in zip(model.caches(), expected):
            assert torch.equal(cache.pos[..., :30].long(), kept)
    assert all((kept[..., :4] == torch.arange(4)).all() for kept in [model.caches()[0].pos[..., :30]])


def reference_global(scores: list[list[list[float]]], n_keep: int) -> set:
    """One row's n_keep best (layer, head, position) of scores[layer][head][position], ties earliest first."""
    entries = [(-value, layer, head, pos) for layer, heads in enumerate(scores) for head, row in enumerate(heads)
               for pos, value in enumerate(row)]
    return {entry[1:] for entry in sorted(entries)[:n_keep]}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.data())
def test_the_global_budget_keeps_the_best_entries_of_every_layer_and_head_together(n_batch, n_layers, n_kv_heads,
                                                                                    n_tokens, data):
    """chunkkv.global_scores against a sort of every (layer, head, position) entry: scores from a few
    values (ties) and +inf (sinks); kept entries keep their scores, the rest become -inf."""
    values = st.sampled_from([0.0, 0.25, 0.5, 1.0, math.inf])
    scores = [torch.tensor(data.draw(st.lists(st.lists(st.lists(values, min_size=n_tokens, max_size=n_tokens),
                                                       min_size=n_kv_heads, max_size=n_kv_heads),
                                              min_size=n_batch, max_size=n_batch))) for _ in range(n_layers)]
    budgets = data.draw(st.lists(st.integers(0, n_tokens), min_size=n_layers, max_size=n_layers))
    got = chunkkv.global_scores(CompressionConfig(method="kvzip", global_budget=True), scores, budgets)
    for b in range(n_batch):
        kept = {(layer, head, pos) for layer, s in enumerate(got) for head in range(n_kv_heads)
                for pos in range(n_tokens) if s[b, head, pos] > -math.inf}
        assert kept == reference_global([s[b].tolist() for s in scores], n_kv_heads * sum(budgets))
        assert all(got[layer][b, head, pos] == scores[layer][b, head, pos] for layer, head, pos in kept)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2), st.integers(1, 25), st.integers(1, 6), st.integers(1, 5),
       st.data())
def test_the_global_chunk_budget_keeps_the_best_chunks_of_every_layer_together(n_batch, n_layers, n_kv_heads, n_tokens,
                                                                               window, chunk_size, data):
    """chunkkv with global_budget against a plain sort: every layer's window, then the prefix tokens of all
    layers ordered by their chunk's score (summed over heads and the chunk), then layer and position
    (whole chunks, best first; the last one cut), as many as the budgets' prefix parts sum to."""
    values = st.sampled_from([0.0, 0.25, 0.5, 1.0, math.inf])
    scores = [torch.tensor(data.draw(st.lists(st.lists(st.lists(values, min_size=n_tokens, max_size=n_tokens),
                                                       min_size=n_kv_heads, max_size=n_kv_heads),
                                              min_size=n_batch, max_size=n_batch))) for _ in range(n_layers)]
    budget = data.draw(st.integers(window + 1, n_tokens + window + 1))
    config = CompressionConfig(method="chunkkv", scorer="reconstruct", global_budget=True, window=window,
                               chunk_size=chunk_size)
    got = chunkkv.global_scores(config, scores, [budget] * n_layers)
    n_window = min(window, n_tokens)
    n_prefix = n_tokens - n_window
    for b in range(n_batch):
        token = [[sum(s[b, h, p].item() for h in range(n_kv_heads)) for p in range(n_tokens)] for s in scores]
        chunk = [[sum(row[c:min(c + chunk_size, n_prefix)]) for c in range(0, n_prefix, chunk_size)] for row in token]
        order = sorted((-chunk[layer][p // chunk_size], layer, p) for layer in range(n_layers) for p in range(n_prefix))
        kept = {(layer, p) for _, layer, p in order[:n_layers * min(budget - n_window, n_prefix)]}
        kept |= {(layer, p) for layer in range(n_layers) for p in range(n_prefix, n_tokens)}
        assert {(layer, p) for layer, s in enumerate(got) for p in range(n_tokens) if s[b, p] > -math.inf} == kept


def test_kvzip_with_a_global_budget_keeps_that_many_entries_shared_out_by_score(tmp_path):
    """Every layer's caches hold the entries global_scores picks from the reconstruction scores, per KV
    head (-1 where a head keeps fewer): L x Hkv x budget in all, not the same count in every head; the
    file saved from it loads and answers bit for bit."""
    from conftest import byte_tokenizer
    from contexts import load_context, save_context
    model = tiny_model()
    context, question = torch.randint(0, 256, (1, 100)), torch.randint(0, 256, (1, 5))
    full_prefill(model, context, 60)
    config = CompressionConfig(method="kvzip", budget=30, global_budget=True)
    expected = chunkkv.global_scores(config, reconstruction_scores(model, context, REPEAT, 4), [30, 30])
    compressed = compress_context(model, context, config, 16, repeat=REPEAT)
    kept = model.kept_positions([100])
    for layer, scores in zip(kept, expected):
        for head in range(scores.shape[1]):
            chosen = torch.nonzero(scores[0, head] > -math.inf).flatten().tolist()
            assert [p for p in layer[0, head].tolist() if p >= 0] == chosen
    counts = [int((layer[0, head] >= 0).sum()) for layer in kept for head in range(layer.shape[1])]
    assert sum(counts) == 2 * 2 * 30 and len(set(counts)) > 1
    record = answer(model, compressed, question, 4)
    save_context(tmp_path / "c.kv", model, byte_tokenizer(), compressed)
    fresh = tiny_model()
    assert torch.equal(answer(fresh, load_context(tmp_path / "c.kv", fresh, byte_tokenizer()), question, 4).tokens,
                       record.tokens)


def test_the_reconstruct_scorer_is_refused_where_it_cannot_run():
    for kwargs, message in [(dict(method="full", scorer="reconstruct"), "full runs only on its own scorer"),
                            (dict(method="fastgen", scorer="reconstruct"), "fastgen runs only on its own scorer"),
                            (dict(method="kvzip", scorer="window"), "kvzip runs only on its own scorer"),
                            (dict(scorer="kvzip"), "unknown scorer 'kvzip'"),
                            (dict(global_budget=True), "for kvzip and chunkkv on the reconstruct scorer"),
                            (dict(method="snapkv", scorer="reconstruct", global_budget=True), "for kvzip and chunkkv"),
                            (dict(method="kvzip", global_budget=True, reuse=2), "without reuse, per_head"),
                            (dict(scorer="reconstruct", global_budget=True, per_head=True), "without reuse, per_head"),
                            (dict(scorer="reconstruct", global_budget=True, host=True), "per_head or host")]:
        with pytest.raises(CompressionError, match=message):
            CompressionConfig(**kwargs)
    model = tiny_model()
    with pytest.raises(CompressionError, match="pass repeat="):
        compress_context(model, torch.randint(0, 256, (1, 90)), CompressionConfig(method="kvzip", budget=30))
    from generate import generate
    with pytest.raises(CompressionError, match="teacher-forcing a repeat"):
        generate(model, torch.randint(0, 256, (1, 90)), CompressionConfig(method="kvzip", budget=30), 4)
    from model import PromptError
    with pytest.raises(PromptError, match="its repeat of"):
        compress_context(tiny_model(max_seq_len=120), torch.randint(0, 256, (1, 90)), CompressionConfig(method="kvzip", budget=30),
                         8, repeat=REPEAT)


CONTEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day in the old town of Ur.\n" * 2


def test_the_repeat_prompts_are_written_as_questions_are_in_the_chat_format(tmp_path):
    """With a template, the prompts end with its turn to the assistant (the suffix, before each block);
    without one, a newline is the suffix (kvpress's rule)."""
    import json

    from cli import split_prompt
    from conftest import byte_tokenizer, write_tiny_dir
    from tokenizer import REPEAT_FIRST, REPEAT_LATER, chat_format, encode_text, repeat_prompts

    tokenizer, path = byte_tokenizer(), write_tiny_dir(tmp_path / "tiny")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"}))
    chat = chat_format(path)
    _, asks = split_prompt(tokenizer, CONTEXT, [REPEAT_FIRST, REPEAT_LATER], chat)
    first, later, suffix = repeat_prompts(tokenizer, asks, chat)
    assert tokenizer.decode(suffix) == "\nAssistant:"
    assert tokenizer.decode(first).strip() == REPEAT_FIRST and tokenizer.decode(later).strip() == REPEAT_LATER
    _, asks = split_prompt(tokenizer, CONTEXT, [REPEAT_FIRST, REPEAT_LATER], None)
    assert repeat_prompts(tokenizer, asks, None) == (asks[0], asks[1], encode_text(tokenizer, "\n").ids)


def test_the_cli_compresses_a_context_by_its_repeat_and_refuses_the_scorer_elsewhere(tmp_path):
    from conftest import assert_user_error, cli, write_tiny_dir

    (tmp_path / "context.txt").write_text(CONTEXT)
    tiny = ("--checkpoint", str(write_tiny_dir(tmp_path / "tiny", context=1024)), "--max-new-tokens", "4")
    for flags in (("--method", "kvzip"), ("--scorer", "reconstruct", "--window", "8")):
        result = cli(*tiny, *flags, "--keep", "0.2", "--context-file", str(tmp_path / "context.txt"), "--question", "Who?")
        assert result.returncode == 0, result.stderr
        assert "KV kept per layer 35 of 174" in result.stdout and "--- question 1: Who? ---" in result.stdout
    result = cli(*tiny, "--method", "kvzip", "--global-budget", "--keep", "0.2", "--context-file",
                 str(tmp_path / "context.txt"), "--question", "Who?")
    assert result.returncode == 0, result.stderr
    assert "method            kvzip (global budget, reuse 1)" in result.stdout
    kept = re.search(r"KV kept per layer ([\d.]+)-([\d.]+) of 174 \(([\d.]+) %\)", result.stdout)
    assert kept and float(kept[1]) < float(kept[2]) and float(kept[3]) == 20.1  # 35 of 174 on average
    assert_user_error(cli(*tiny, "--global-budget", "--context-file", str(tmp_path / "context.txt"), "--question", "Who?"),
                      "global_budget ranks every layer's entries together, for kvzip and chunkkv on the reconstruct")
    assert_user_error(cli(*tiny, "--scorer", "reconstruct", "--prompt", "Hi"), "the reconstruct scorer repeats a context",
                      "use --context-file")
    assert_user_error(cli(*tiny, "--method", "fastgen", "--scorer", "reconstruct", "--prompt", "Hi"),
                      "fastgen runs only on its own scorer")
