"""Tests for re-compression of a full cache (decode-time ChunkKV, SnapKV, StreamingLLM), the
cache budget in generate, and the interactive chat CLI. Tiny random models; the chat template
checks also read the converted real checkpoints when they are present (marked `model`)."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkkv
from chunkkv import CompressionConfig, CompressionError
from conftest import cli, masked_reference, reference_select, tiny_model
from generate import Recompression, compile_decode, extend_all, generate, prefill_and_compress
from model import Transformer

torch.set_grad_enabled(False)

RECOMPRESSING = [("chunkkv", dict(method="chunkkv")), ("chunkkv-per-head", dict(method="chunkkv", per_head=True)),
                 ("snapkv", dict(method="snapkv")), ("streaming", dict(method="streaming"))]


# ---------------------------------------------------------------------------------------
# Selection over cache slots, against plain Python

def naive_slot_scores(q_win: torch.Tensor, k: torch.Tensor) -> list[list[list[float]]]:
    """Per KV head, per slot: window attention (query i sees slots up to n - W + i) summed over
    window queries and over the query heads of the group, in float64 loops. [B][Hkv][n]."""
    n_batch, n_heads, n_window, head_dim = q_win.shape
    n_kv_heads, n_used = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    out = [[[0.0] * n_used for _ in range(n_kv_heads)] for _ in range(n_batch)]
    for b in range(n_batch):
        for h in range(n_heads):
            for i in range(n_window):
                seen = n_used - n_window + i + 1
                logits = [sum(float(q_win[b, h, i, d]) * float(k[b, h // group, j, d]) for d in range(head_dim))
                          / math.sqrt(head_dim) for j in range(seen)]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for j, w in enumerate(weights):
                    out[b][h // group][j] += w / sum(weights)
    return out


@st.composite
def slot_case(draw):
    window = draw(st.integers(1, 6))
    chunk_size = draw(st.integers(1, 6))
    n_used = draw(st.integers(window + 2, 40))
    budget = draw(st.integers(window + 1, n_used - 1))
    return window, chunk_size, n_used, budget, draw(st.integers(0, 2 ** 31 - 1)), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(slot_case())
def test_chunkkv_recompression_is_the_optimal_chunk_selection(case):
    """Exactly `budget` slots, the last `window` slots kept, whole chunks of consecutive slots
    but at most one, and the same choice a plain-Python ranking makes from scores of the
    buffered queries written out in loops; no dropped whole chunk outscores a kept one."""
    window, chunk_size, n_used, budget, seed, per_head = case
    gen = torch.Generator().manual_seed(seed)
    q_win, k = torch.randn(2, 4, window, 4, generator=gen), torch.randn(2, 2, n_used, 4, generator=gen)
    config = CompressionConfig(method="chunkkv", window=window, chunk_size=chunk_size, per_head=per_head)
    kept = chunkkv.recompress_slots(config, q_win, k, budget)
    naive = naive_slot_scores(q_win, k)
    for b in range(2):
        rows = [(naive[b][h], kept[b, h]) for h in range(2)] if per_head else \
               [([sum(col) / 2 for col in zip(*naive[b])], kept[b])]  # per layer: both KV heads (the /2 keeps the order)
        for scores, slots in rows:
            slots = slots.tolist()
            assert len(slots) == budget == len(set(slots)) and slots == sorted(slots)
            assert slots[-window:] == list(range(n_used - window, n_used))
            n_prefix = n_used - window
            chunks = [list(range(s, min(s + chunk_size, n_prefix))) for s in range(0, n_prefix, chunk_size)]
            partial = [c for c in chunks if 0 < len(set(c) & set(slots)) < len(c)]
            assert len(partial) <= 1
            whole = [c for c in chunks if set(c) <= set(slots)]
            dropped = [c for c in chunks if not set(c) & set(slots)]
            if whole and dropped:
                assert max(sum(scores[p] for p in c) for c in dropped) <= min(sum(scores[p] for p in c)
                                                                              for c in whole) + 1e-6
            if len({round(sum(scores[p] for p in c), 5) for c in chunks}) == len(chunks):  # no near ties
                assert slots == reference_select(scores, budget, window, chunk_size)


@pytest.mark.parametrize("label, kwargs", RECOMPRESSING)
def test_every_recompressing_method_keeps_exactly_the_budget_and_the_window(label, kwargs):
    config = CompressionConfig(window=5, **kwargs)
    q_win, k = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 37, 8)
    kept = chunkkv.recompress_slots(config, q_win, k, 20)
    assert kept.shape[-1] == 20
    assert (kept[..., -5:] == torch.arange(32, 37)).all()
    assert (kept.diff(dim=-1) > 0).all()
    if label == "streaming":
        assert (kept[..., :4] == torch.arange(4)).all() and (kept[..., 4:] == torch.arange(21, 37)).all()


@pytest.mark.parametrize("method", ["full", "h2o", "pyramidkv", "fastgen"])
def test_other_methods_refuse_with_one_line(method):
    with pytest.raises(CompressionError, match="use one of chunkkv, snapkv, streaming") as error:
        Recompression(CompressionConfig(method=method), 64)
    assert "\n" not in str(error.value)
    with pytest.raises(CompressionError, match="use one of chunkkv, snapkv, streaming"):
        chunkkv.recompress_slots(CompressionConfig(method=method), torch.randn(1, 4, 32, 8), torch.randn(1, 2, 40, 8), 33)


def test_impossible_cache_budgets_are_refused():
    with pytest.raises(CompressionError, match="window \\(32\\) < budget < cache budget"):
        Recompression(CompressionConfig(), 40)  # 3/4 of 40 = 30, below the window
    with pytest.raises(CompressionError, match="budget < cache budget"):
        Recompression(CompressionConfig(budget=64), 64)


# ---------------------------------------------------------------------------------------
# The model after re-compressions = attention over exactly the kept entries

def run_recorded(model: Transformer, prompt: torch.Tensor, forced: torch.Tensor, config: CompressionConfig,
                 cache_budget: int, pieces: list[int] | None = None):
    """Prefill `prompt` into a cache of `cache_budget` slots, then append `forced` [B, n] (one
    token at a time, or in `pieces`), re-compressing when full. Returns (logits [B, n + 1, vocab]
    after the prompt and after each forced token, per layer the [B, Hkv, n_all, n_all] mask of
    the positions each query saw according to the cache, re-compression count)."""
    recompression = Recompression(config, cache_budget)
    logits, _ = prefill_and_compress(model, prompt, [prompt.shape[1]] * prompt.shape[0], config, forced.shape[1],
                                     recompression=recompression)
    n_prompt, n_all = prompt.shape[1], prompt.shape[1] + forced.shape[1]
    seen = [torch.ones(prompt.shape[0], model.args.n_kv_heads, n_all, n_all, dtype=torch.bool).tril()
            for _ in model.layers]
    outputs, start = [logits[:, None]], 0
    for n in pieces or [1] * forced.shape[1]:
        before = recompression.count
        recompression.make_room(model, n)
        if recompression.count > before:  # every layer and row back to exactly the budget
            assert all((cache.used == recompression.budget).all() for cache in model.caches())
        outputs.append(model.extend(forced[:, start:start + n]))
        for layer, cache in enumerate(model.caches()):
            assert int(cache.used.max()) <= cache_budget
            positions = cache.pos.long()  # [B, Hkv, slots], -1 = empty
            in_cache = torch.zeros(*positions.shape[:2], n_all + 1, dtype=torch.bool)
            in_cache.scatter_(2, torch.where(positions >= 0, positions, n_all), True)
            for p in range(n_prompt + start, n_prompt + start + n):
                seen[layer][:, :, p] = in_cache[..., :n_all] & (torch.arange(n_all) <= p)
        start += n
    return torch.cat(outputs, 1), seen, recompression.count


@pytest.mark.parametrize("label, kwargs", RECOMPRESSING)
@pytest.mark.parametrize("pieces", [None, [7, 1, 8, 3, 8, 8, 5, 8, 8, 4]])
def test_outputs_after_recompression_attend_to_exactly_the_kept_entries(label, kwargs, pieces):
    """Decoded (or extended) tokens through several re-compressions equal a masked reference
    attention over the positions the cache says it holds, at their original positions; those
    sets are the window plus older entries of the previous set, never more than the cache
    budget; the query buffer holds the reference's last `window` queries."""
    model = tiny_model(n_layers=3)
    prompt, forced = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 60))
    config = CompressionConfig(budget=24, window=6, chunk_size=4, **kwargs)
    logits, seen, count = run_recorded(model, prompt, forced, config, 32, pieces)
    assert count >= 5  # 24 kept, 8 free: a re-compression every 8 tokens
    tokens = torch.cat([prompt, forced], 1)
    reference, queries = masked_reference(model, tokens, seen)
    torch.testing.assert_close(logits, reference[:, 39:], rtol=1e-4, atol=1e-4)
    for layer, cache in enumerate(model.caches()):
        torch.testing.assert_close(cache.queries, queries[layer][:, :, -6:], rtol=1e-4, atol=1e-5)
        mask = seen[layer]
        for p in range(41, 100):
            now, before = mask[:, :, p, :p], mask[:, :, p - 1, :p]
            assert (now <= before).all()  # nothing dropped comes back
            assert now[..., p - 5:].all()  # the window (with p itself: the last 6) is always there
            assert (mask[:, :, p].sum(-1) <= 32).all()
    # and re-compression did change the answer: the test notices a cache that kept everything
    assert (logits[:, 1:] - model(tokens)[:, 40:]).abs().max() > 1e-3


def test_with_a_budget_above_the_final_length_nothing_is_recompressed():
    """Prompt and output fit: no re-compression ever, tokens and logits of the full cache."""
    model = tiny_model(n_layers=2)
    prompt, forced = torch.randint(0, 256, (2, 30)), torch.randint(0, 256, (2, 40))
    for label, kwargs in RECOMPRESSING:
        logits, _, count = run_recorded(model, prompt, forced, CompressionConfig(window=6, **kwargs), 96)
        assert count == 0
        torch.testing.assert_close(logits, model(torch.cat([prompt, forced], 1))[:, 29:], rtol=1e-5, atol=1e-5)
        record = generate(model, prompt, CompressionConfig(window=6, **kwargs), 50, cache_budget=96)
        assert record.recompressions == 0
        assert torch.equal(record.tokens, generate(model, prompt, CompressionConfig(method="full"), 50).tokens)


def test_generation_longer_than_the_cache():
    model = tiny_model(n_layers=2)
    record = generate(model, torch.randint(0, 256, (1, 20)), CompressionConfig(window=8), 200, cache_budget=48)
    assert record.tokens.shape == (1, 200)
    assert record.recompressions == math.ceil((200 - 1 - (48 - 20)) / (48 - 36))  # 36 kept, 12 free each time
    assert record.recompress_seconds > 0
    assert all(int(cache.used.max()) <= 48 for cache in model.caches())


def test_extend_longer_than_the_free_slots_goes_in_pieces():
    model = tiny_model(n_layers=2)
    recompression = Recompression(CompressionConfig(window=4, budget=20), 32)
    prefill_and_compress(model, torch.randint(0, 256, (1, 16)), [16], recompression.config, 100,
                         recompression=recompression)
    extend_all(model, torch.randint(0, 256, (1, 100)), recompression)
    assert recompression.count == 7  # 16 free slots first, then 12 after each re-compression: 16 + 7 * 12 = 100
    assert int(model.caches()[0].length[0]) == 116 and int(model.caches()[0].used[0]) <= 32


def test_the_caches_keep_their_tensors_across_calls_of_one_size():
    """A CUDA graph reads fixed addresses: a call without re-compression dropped the query buffer,
    and the next call with it allocated a new one, a silent re-recording each time."""
    model = tiny_model()
    prompt, config = torch.randint(0, 256, (1, 60)), CompressionConfig(budget=40, window=4)
    addresses = []
    for kwargs in (dict(cache_budget=48), dict(n_slots=48), dict(cache_budget=48)):
        generate(model, prompt, config, max_new_tokens=8, **kwargs)
        addresses.append([t.data_ptr() for layer in model.cache_tensors() for t in layer if t is not None])
    assert addresses[0] == addresses[2] and addresses[1] == addresses[0]


def test_compiled_decode_is_one_graph_across_recompressions():
    """The compiled step serves many re-compressions and a second prompt with recompiles made an
    error, and gives the eager tokens."""
    model = tiny_model(n_layers=2)
    config = CompressionConfig(window=6, budget=24, chunk_size=4)
    prompts = torch.randint(0, 256, (2, 1, 30))
    eager = [generate(model, prompt, config, 60, cache_budget=32).tokens for prompt in prompts]
    decode = compile_decode(model)
    generate(model, prompts[0], config, 3, decode=decode, cache_budget=32)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        for prompt, expected in zip(prompts, eager):
            record = generate(model, prompt, config, 60, decode=decode, cache_budget=32)
            assert torch.equal(record.tokens, expected)
            assert record.recompressions >= 5


# ---------------------------------------------------------------------------------------
# Interactive chat

def test_interactive_cli_from_a_pipe_keeps_the_cache_bounded(tiny_dir):
    (tiny_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    turns = "What is the first thing?\nAnd a second one, somewhat longer than the first.\nthird\n"
    result = cli("--checkpoint", str(tiny_dir), "--interactive", "--cache-budget", "48", "--window", "8",
                 "--max-new-tokens", "24", stdin=turns, process=True)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[cache: ")]
    assert len(lines) == 3
    used = [int(line.split()[1]) for line in lines]
    counts = [int(line.split(", ")[1].split()[0]) for line in lines]
    assert all(0 < u <= 48 for u in used) and " of 48 entries used" in lines[0]
    assert counts[-1] >= 4 and counts == sorted(counts)  # ~190 tokens through 48 slots
    empty = cli("--checkpoint", str(tiny_dir), "--interactive", "--window", "8", stdin="")
    assert empty.returncode == 0 and "[cache" not in empty.stdout  # EOF at once: a clean exit


@pytest.mark.parametrize("label, kwargs", RECOMPRESSING[:1] + RECOMPRESSING[2:])
def test_extend_in_pieces_equals_decoding_one_by_one(label, kwargs):
    """bench.py teacher-forces long texts with extend_all: re-compressions fall where one-by-one
    decoding puts them, so the logits are the same."""
    model = tiny_model(n_layers=2)
    prompt, forced = torch.randint(0, 256, (1, 20)), torch.randint(0, 256, (1, 70))
    config = CompressionConfig(budget=24, window=6, chunk_size=4, **kwargs)
    one_by_one, _, count = run_recorded(model, prompt, forced, config, 32)
    recompression = Recompression(config, 32)
    first, _ = prefill_and_compress(model, prompt, [20], config, 70, recompression=recompression)
    pieces = extend_all(model, forced, recompression)
    assert recompression.count == count
    torch.testing.assert_close(torch.cat([first[:, None], pieces], 1), one_by_one, rtol=1e-4, atol=1e-4)


@pytest.mark.model
def test_bench_recompress_quick_runs(bench_checkpoint, tmp_path):
    out = tmp_path / "recompress.json"
    result = cli("recompress", "--quick", "--parts", "retrieval", "speed", "--cases", "1", "--caps", "128",
                 "--new-tokens", "300", "--checkpoint", bench_checkpoint, "--out", str(out), script="bench.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    retrieval = [r for r in rows if r["part"] == "retrieval"]
    assert {(r["method"], r["cache_budget"]) for r in retrieval} == {("full", None), ("chunkkv", 128), ("snapkv", 128),
                                                                     ("streaming", 128)}
    assert all(r["recompressions"] > 0 for r in retrieval if r["cache_budget"])
    speed = [r for r in rows if r["part"] == "speed"]  # 256 + 300 tokens through 512 slots: one re-compression
    assert sorted((r["method"], r["round"]) for r in speed) == sorted((m, i) for m in ("full", "chunkkv", "snapkv",
                                                                                        "streaming") for i in (0, 1))
    assert all(r["recompressions"] == (0 if r["method"] == "full" else 1) for r in speed)
    assert "Early fact recalled" in result.stdout and "| streaming | 512   | 300" in result.stdout


def test_a_keep_fraction_with_a_cache_budget_is_refused_as_the_cli_refuses_it():
    """A re-compressed cache keeps an absolute budget: generate once ignored keep=0.1 with a cache budget."""
    model = tiny_model()
    with pytest.raises(CompressionError, match="keep is a fraction of the prompt"):
        generate(model, torch.randint(0, 256, (1, 40)), CompressionConfig(keep=0.1, window=4), 8, cache_budget=64)
