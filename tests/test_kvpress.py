"""kvpress's own press tests (NVIDIA/kvpress tests/test_press_call.py, tests/presses/test_presses.py,
test_head_compression.py, test_budget_floor_sweep.py, tests/test_pipeline.py; its test_generate.py is
in tests/test_hf.py, against chunkkv's own model), re-run on integrations.hf.ChunkKVPress offline:
their fixtures download models from the hub, these build tiny ones here. Then the measured
differences of kvpress's own ChunkKVPress from the paper's ChunkKV that docs/integrations.md reports
upstream, each on the input that shows it."""
import logging
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("kvpress", reason="the press needs kvpress: pip install -e '.[hf]' (.ci/run: its second environment)")
from kvpress import ChunkKVPress as KvpressChunkKV  # noqa: E402
from kvpress import EntropyGatedChunkKVPress  # noqa: E402
from kvpress import KVPressTextGenerationPipeline, KVzipPress, PyramidKVPress, ScorerPress, SnapKVPress  # noqa: E402
from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import checkpoint  # noqa: E402
import chunkkv  # noqa: E402
from chunkkv import CompressionConfig  # noqa: E402
from conftest import byte_tokenizer, reference_select  # noqa: E402
from contexts import Repeat, reconstruct_and_compress, reconstruction_scores  # noqa: E402
from integrations.hf import ChunkKVPress, queries  # noqa: E402
from model import CacheRequest  # noqa: E402
from tokenizer import REPEAT_FIRST, REPEAT_LATER  # noqa: E402

METHODS = ["full", "streaming", "h2o", "snapkv", "pyramidkv", "chunkkv", "fastgen"]


def tiny_llama(n_layers: int = 3, seed: int = 0, attn: str = "sdpa", n_kv_heads: int = 2) -> LlamaForCausalLM:
    """A tiny random Llama (weights far from init: peaked attention), the unit-test model's stand-in."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=n_kv_heads, intermediate_size=128, vocab_size=256,
                         max_position_embeddings=1024, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def ids(n_rows: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n_rows, n_tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def compress(model, press, input_ids) -> DynamicCache:
    cache = DynamicCache()
    with press(model):
        model(input_ids, past_key_values=cache)
    return cache


@torch.no_grad()
def kept(model, press, input_ids) -> list[torch.Tensor]:
    """Each layer's kept positions [B, Hkv, N], read off the compressed cache against the full one."""
    full = compress(model, ChunkKVPress(method="full"), input_ids)
    held = []
    for layer, whole in zip(compress(model, press, input_ids).layers, full.layers):
        match = (layer.keys[:, :, :, None] == whole.keys[:, :, None]).all(-1)  # [B, Hkv, N, T]
        held.append(match.int().argmax(-1))
    return held


# ---------------------------------------------------------------------------------------
# kvpress's tests/test_press_call.py and tests/presses/test_presses.py

def test_the_context_manager_adds_and_removes_its_hooks(model):
    press = ChunkKVPress(compression_ratio=0.5)
    with press(model):
        assert all(len(layer.self_attn._forward_hooks) == 1 for layer in model.model.layers)
        assert len(model.model._forward_pre_hooks) == 1  # the token ids, for fastgen
    assert all(len(layer.self_attn._forward_hooks) == 0 for layer in model.model.layers)
    assert len(model.model._forward_pre_hooks) == 0


@pytest.mark.parametrize("method", METHODS[1:-1])
def test_the_context_manager_applies_compression_exactly_to_kvpress_budget(model, method):
    input_ids = ids(1, 150)
    cache = compress(model, ChunkKVPress(method=method, compression_ratio=0.2, window=8), input_ids)
    budgets = [layer.keys.shape[2] for layer in cache.layers]
    assert sum(budgets) == 3 * compute_n_kept(150, 0.2) == 3 * int(150 * 0.8)
    if method != "pyramidkv":
        assert budgets == [int(150 * 0.8)] * 3 and cache.get_seq_length() == int(150 * 0.8)
    uncompressed = model(input_ids, past_key_values=DynamicCache()).past_key_values  # outside the context
    assert [layer.keys.shape[2] for layer in uncompressed.layers] == [150] * 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.4, 0.6, 0.8])
def test_every_method_runs_on_kvpress_unit_test_input(model, method, ratio):
    """kvpress's dummy input: 3 rows of 5 tokens, far below the default window of 32 (the host rule)."""
    input_ids = model.dummy_inputs["input_ids"]
    options = {"special_ids": (0,)} if method == "fastgen" else {}
    press = ChunkKVPress(method=method, compression_ratio=ratio, options=options)
    cache = compress(model, press, input_ids)
    expected = 5 if method in ("full", "fastgen") else compute_n_kept(5, ratio)
    assert all(layer.keys.shape == (3, 2, expected, 16) for layer in cache.layers)
    if method != "full" and expected < 5:  # a budget within the window keeps the last tokens (streaming: sinks)
        held = kept(model, press, input_ids)
        first = list(range(expected)) if method == "streaming" else list(range(5 - expected, 5))
        assert all(h.tolist() == [[first] * 2] * 3 for h in held)


@torch.no_grad()
def test_the_press_keeps_the_best_scored_positions_of_transformers_own_attention():
    """kvpress's test_presses_keep_highest_score, with the oracle outside chunkkv: transformers' eager
    attention weights (output_attentions), scored and selected in plain Python (conftest)."""
    model = tiny_llama(attn="eager")
    input_ids, window = ids(2, 120, seed=3), 16
    attentions = model(input_ids, output_attentions=True).attentions  # per layer [B, Hq, T, T]
    n_kept = compute_n_kept(120, 0.7)
    for method, per_head in [("chunkkv", False), ("chunkkv", True), ("snapkv", False)]:
        held = kept(model, ChunkKVPress(method=method, compression_ratio=0.7, window=window, per_head=per_head),
                    input_ids)
        for layer, attention in enumerate(attentions):
            window_attention = attention[:, :, -window:].sum(2)  # [B, Hq, T]
            for row in range(2):
                for head in range(2):
                    group = window_attention[row, 2 * head:2 * head + 2]
                    if method == "snapkv":
                        expected = top_pooled(group.mean(0).tolist(), n_kept, window, 7)
                    else:
                        scores = (group.mean(0) if per_head else window_attention[row].sum(0)).tolist()
                        expected = reference_select(scores, n_kept, window, 10)
                    assert held[layer][row, head].tolist() == expected, (method, per_head, layer, row, head)


def top_pooled(scores: list[float], budget: int, window: int, kernel: int) -> list[int]:
    """SnapKV in plain Python: prefix scores max-pooled over `kernel` neighbours, the best ones + the window."""
    n_prefix = len(scores) - window
    pooled = [max(scores[max(0, i - kernel // 2):min(n_prefix, i + kernel // 2 + 1)]) for i in range(n_prefix)]
    best = sorted(range(n_prefix), key=lambda i: (-pooled[i], i))[:budget - window]
    return sorted(best + list(range(n_prefix, len(scores))))


# ---------------------------------------------------------------------------------------
# kvpress's test_head_compression.py and test_budget_floor_sweep.py

@torch.no_grad()
def test_fastgen_masks_exactly_each_heads_padding():
    """kvpress's head-wise compression: heads keep different counts, so the cache holds the largest
    head's count and module.masked_key_indices marks the rest of every head, for kvpress's attention
    patch to hide when decoding. The counts come from transformers' own eager attention weights."""
    model = tiny_llama(attn="eager")
    input_ids, window = ids(2, 80, seed=4), 8
    attentions = model(input_ids, output_attentions=True).attentions
    press = ChunkKVPress(method="fastgen", window=window, options=dict(recovery=0.6, special_ids=(0,)))
    compress(model, press, input_ids)
    for block, attention in zip(model.model.layers, attentions):
        scores = attention[:, :, -window:].sum(2).view(2, 2, 2, 80).mean(2)  # [B, Hkv, T]
        counts = chunkkv.fastgen_mask(scores, input_ids, press.config(80)).sum(-1)  # [B, Hkv]
        n_slots = int(counts.max())
        masked = torch.zeros(2, 2, n_slots, dtype=torch.bool)
        if block.self_attn.masked_key_indices is not None:
            masked[block.self_attn.masked_key_indices] = True
        expected = torch.arange(n_slots) >= counts[..., None]  # each head's slots past its own count
        assert torch.equal(masked, expected)
    assert (counts < 80).any() and (counts != counts.max()).any()  # the input does show uneven heads


@pytest.mark.parametrize("ratio", [0.8, 0.95, 0.99])
@pytest.mark.parametrize("method", ["chunkkv", "snapkv", "h2o", "pyramidkv", "streaming"])
def test_short_contexts_never_empty_a_layer(model, method, ratio):
    """kvpress asks any ratio of any length (5 or 8 tokens at 0.8-0.99): every layer keeps
    compute_n_kept >= 1 entries, the last ones (streaming: the first), never an error."""
    for n_tokens in (5, 8):
        input_ids = ids(1, n_tokens)
        held = kept(model, ChunkKVPress(method=method, compression_ratio=ratio), input_ids)
        n_kept = compute_n_kept(n_tokens, ratio)
        first = range(n_kept) if method == "streaming" else range(n_tokens - n_kept, n_tokens)
        assert all(h[0, 0].tolist() == list(first) for h in held)


# ---------------------------------------------------------------------------------------
# kvpress's tests/test_pipeline.py and tests/test_generate.py

@pytest.fixture(scope="module")
def pipe(model):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), bos_token="!", eos_token="#")
    return KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")


CONTEXT = "This is a test article. It was written on 2022-01-01. " * 4


@pytest.mark.parametrize("method", ["chunkkv", "snapkv", "streaming"])
def test_the_kvpress_pipeline_compresses_the_context(pipe, method, caplog):
    """Query-agnostic, as kvpress runs it: the context alone is compressed, the questions follow."""
    press = ChunkKVPress(method=method, compression_ratio=0.4, window=8)
    with caplog.at_level(logging.DEBUG):
        answers = pipe(CONTEXT, questions=["When was this article written?"] * 2, press=press,
                       max_new_tokens=5)["answers"]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers) and answers[0] == answers[1]
    messages = [record.message for record in caplog.records]
    n_context = 1 + len(CONTEXT)  # the bos string and one token per byte (no chat template)
    assert f"Context Length: {n_context}" in messages
    assert f"Compressed Context Length: {compute_n_kept(n_context, 0.4)}" in messages


def test_per_layer_budgets_need_one_token_steps_under_sdpa_as_kvpress_own_pyramidkv(pipe):
    """pyramidkv's layers hold different lengths; transformers builds one sdpa mask from layer 0's, so a
    question of several tokens fails, for kvpress's own PyramidKVPress as for this press (kvpress:
    per-layer budgets need flash attention). One token at a time needs no mask (tests/test_hf.py)."""
    for press in (ChunkKVPress(method="pyramidkv", compression_ratio=0.4, window=8),
                  PyramidKVPress(compression_ratio=0.4, window_size=8)):
        with pytest.raises(RuntimeError, match="must match the size"):
            pipe(CONTEXT, question="When?", press=press, max_new_tokens=3)


@pytest.mark.parametrize("question", ["When was this article written?", ""])
def test_the_pipeline_takes_one_question_none_or_a_cache(pipe, question):
    press = ChunkKVPress(compression_ratio=0.4, window=8)
    assert isinstance(pipe(CONTEXT, question=question, press=press, max_new_tokens=3)["answer"], str)
    cache = DynamicCache()
    pipe(CONTEXT, question=question, press=press, cache=cache, max_new_tokens=3)
    assert cache.get_seq_length() == compute_n_kept(1 + len(CONTEXT), 0.4)  # the answer is rolled back


# ---------------------------------------------------------------------------------------
# chunkkv.chunk_priority in a host that keeps the top-k of any score: kvpress's own ScorerPress

@dataclass
class PriorityChunkKV(ScorerPress):
    """ChunkKV in kvpress as a plain ScorerPress: its top-k of chunk_priority is ChunkKV's selection."""
    window: int = 32
    chunk_size: int = 10

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        q = queries(module, hidden_states, kwargs["position_embeddings"], min(self.window, keys.shape[2]))
        priority = chunkkv.chunk_priority(chunkkv.window_scores(q, keys), self.window, self.chunk_size)  # [B, T]
        return priority[:, None].expand(-1, keys.shape[1], -1)


@pytest.mark.parametrize("ratio", [0.3, 0.7, 0.9, 0.99])
def test_kvpress_top_k_of_chunk_priority_is_chunkkv(model, ratio):
    input_ids = ids(2, 137, seed=5)
    theirs = kept(model, PriorityChunkKV(compression_ratio=ratio), input_ids)
    ours = kept(model, ChunkKVPress(method="chunkkv", compression_ratio=ratio), input_ids)
    for a, b in zip(theirs, ours):  # kvpress leaves the entries in top-k order, the press sorted
        assert torch.equal(a.sort(dim=-1).values, b)


# ---------------------------------------------------------------------------------------
# kvpress's own ChunkKVPress against the paper's definition (docs/integrations.md, "Upstream report")

@torch.no_grad()
def measure_kvpress_chunkkv(n_tokens: int, ratio: float) -> dict:
    """kvpress 0.5.5's ChunkKVPress as its evaluation registers it (SnapKVPress scores, chunk_length
    20) and integrations.hf.ChunkKVPress (the paper's, window 32, chunks of 10) at one ratio, on two
    rows of random tokens (seed 7) through a tiny random 8-layer Llama (seed 0): per layer, what row 1
    keeps next to row 0 and alone, whether the last token is kept, how many of the last 32."""
    model = tiny_llama(n_layers=8, seed=0)
    batch = ids(2, n_tokens, seed=7)
    presses = {"kvpress": KvpressChunkKV(press=SnapKVPress(compression_ratio=ratio), chunk_length=20),
               "ours": ChunkKVPress(method="chunkkv", compression_ratio=ratio)}
    measured = {"budget": compute_n_kept(n_tokens, ratio)}
    for name, press in presses.items():
        both, alone = kept(model, press, batch), kept(model, press, batch[1:])
        measured[name] = {
            "kept": sorted({b.shape[-1] for b in both}),
            "row1_as_alone": [torch.equal(b[1], a[0]) for b, a in zip(both, alone)],
            "row1_as_row0": [torch.equal(b[1], b[0]) for b in both],
            "last_dropped": [layer for layer, b in enumerate(both) if (b[..., -1] != n_tokens - 1).any()],
            "last_32_kept": [int((b[0, 0] >= n_tokens - 32).sum()) for b in both],
        }
    return measured


def test_kvpress_chunkkv_applies_row_0s_chunks_to_every_row():
    measured = measure_kvpress_chunkkv(300, 0.5)
    print(measured)
    assert measured["kvpress"]["row1_as_row0"] == [True] * 8  # row 0's chunks in every layer
    assert measured["kvpress"]["row1_as_alone"] == [False] * 8  # never what row 1 keeps alone
    assert measured["ours"]["row1_as_alone"] == [True] * 8 and measured["ours"]["row1_as_row0"] == [False] * 8


def test_kvpress_chunkkv_does_not_protect_the_window():
    measured = measure_kvpress_chunkkv(600, 0.9)
    print(measured)
    assert measured["budget"] == 59  # room for the last 32 and 27 more
    assert measured["kvpress"]["last_dropped"] == [5]  # the last token is gone in layer 5
    assert measured["kvpress"]["last_32_kept"] == [20, 20, 20, 20, 20, 12, 20, 20]
    assert measured["ours"]["last_dropped"] == [] and measured["ours"]["last_32_kept"] == [32] * 8


def test_kvpress_chunkkv_keeps_whole_chunks_only_so_budgets_come_out_short():
    for n_tokens, ratio, budget, kvpress_kept in [(300, 0.9, 29, 20), (300, 0.7, 90, 80), (300, 0.5, 150, 140),
                                                  (600, 0.9, 59, 40)]:
        measured = measure_kvpress_chunkkv(n_tokens, ratio)
        assert measured["budget"] == budget and measured["ours"]["kept"] == [budget]
        assert measured["kvpress"]["kept"] == [kvpress_kept]


# ---------------------------------------------------------------------------------------
# KVzip: contexts.reconstruction_scores and the kvzip method against kvpress's KVzipPress

@dataclass
class ScoreKeepingKVzip(KVzipPress):
    """kvpress's KVzipPress, its scores [L, B, Hkv, T] kept before compress_post overwrites the sinks'."""
    def compress_post(self, model):
        self.scores = self.score_val.clone()
        super().compress_post(model)


@torch.no_grad()
def kvzip_pair(tmp_path, n_kv_heads: int):
    """The same tiny random Llama in transformers (from a folder, as KVzipPress reads its tokenizer from
    there: the byte tokenizer, no chat template) and in chunkkv."""
    hf = tiny_llama(seed=1, n_kv_heads=n_kv_heads)
    hf.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer()).save_pretrained(tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path).eval(), checkpoint.load(tmp_path)[0]


def kvpress_repeat(block: int) -> Repeat:
    """KVzipPress.prepare's repeat prompts, as contexts.Repeat: without a chat template the suffix is "\\n"."""
    encode = byte_tokenizer().encode
    return Repeat(encode(f"\n\n{REPEAT_FIRST}").ids, encode(f"\n\n{REPEAT_LATER}").ids, encode("\n").ids, block=block)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
@torch.no_grad()
def test_reconstruction_scores_equal_kvpress_kvzip_in_every_layer_and_block(tmp_path, n_kv_heads):
    """Three blocks of 16 (the later two prompted with the previous block's last 8 tokens), each teacher-
    forced on the whole context and rolled back: every context token's score, past the sinks (kvpress
    overwrites them, chunkkv gives them +inf), equals kvpress's, per layer and KV head."""
    hf, model = kvzip_pair(tmp_path, n_kv_heads)
    tokens = ids(1, 44, seed=3)
    press = ScoreKeepingKVzip(compression_ratio=0.5, layerwise=True, chunk_size=16)
    with press(hf):
        hf(input_ids=tokens, past_key_values=DynamicCache())
    n_repeat = max(len(r) for _, _, r in kvpress_repeat(16).prompts(tokens[0].tolist()))
    model.prefill(tokens, CacheRequest(CompressionConfig(method="full"), [44], [[44] * model.args.n_layers], n_repeat))
    ours = reconstruction_scores(model, tokens, kvpress_repeat(16), n_sinks=4)
    for layer, theirs in enumerate(press.scores):
        torch.testing.assert_close(ours[layer][..., 4:], theirs[..., 4:], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.75])
@torch.no_grad()
def test_kvzip_keeps_what_kvpress_kvzip_keeps_with_one_kv_head_and_layerwise_budgets(tmp_path, keep):
    """Where the definitions agree: kvpress's layerwise=True keeps T - int(T x ratio) per layer, the
    lowest-scored pruned across all of a layer's KV heads together (chunkkv's kvzip: the same budget
    in each KV head), so with one KV head the kept sets are equal; sinks kept by both, no window."""
    hf, model = kvzip_pair(tmp_path, 1)
    tokens, n_context = ids(1, 40, seed=4), 40
    press = KVzipPress(compression_ratio=1 - keep, layerwise=True, chunk_size=16)
    with press(hf):
        hf(input_ids=tokens, past_key_values=DynamicCache())
    reconstruct_and_compress(model, tokens, CompressionConfig(method="kvzip", keep=keep), kvpress_repeat(16), room=0)
    for layer, kept in zip(hf.model.layers, model.kept_positions([n_context])):
        _, _, pruned = layer.self_attn.masked_key_indices
        assert kept[0, 0].tolist() == sorted(set(range(n_context)) - set(pruned.tolist()))


@pytest.mark.parametrize("n_kv_heads, keep", [(1, 0.25), (2, 0.25), (2, 0.5), (2, 0.75)])
@torch.no_grad()
def test_kvzip_global_budget_keeps_what_kvpress_kvzip_keeps_across_layers_and_heads(tmp_path, n_kv_heads, keep):
    """KVzip's own budget: kvpress's layerwise=False prunes the int(L x Hkv x T x ratio) lowest scores of
    all layers and KV heads together; chunkkv's kvzip with global_budget keeps the L x Hkv x budget best,
    the same count here, so each layer's and head's kept set is equal (heads keep different counts)."""
    hf, model = kvzip_pair(tmp_path, n_kv_heads)
    tokens, n_context = ids(1, 40, seed=5), 40
    press = KVzipPress(compression_ratio=1 - keep, layerwise=False, chunk_size=16)
    with press(hf):
        hf(input_ids=tokens, past_key_values=DynamicCache())
    config = CompressionConfig(method="kvzip", keep=keep, global_budget=True)
    reconstruct_and_compress(model, tokens, config, kvpress_repeat(16), room=0)
    counts = set()
    for layer, kept in zip(hf.model.layers, model.kept_positions([n_context])):
        _, heads, pruned = layer.self_attn.masked_key_indices
        for head in range(n_kv_heads):
            theirs = sorted(set(range(n_context)) - set(pruned[heads == head].tolist()))
            assert [p for p in kept[0, head].tolist() if p >= 0] == theirs
            counts.add(len(theirs))
    assert len(counts) > 1  # the budget moved between layers or heads


# ---------------------------------------------------------------------------------------
# EG-ChunkKV against kvpress's EntropyGatedChunkKVPress

@dataclass
class FixedScores(ScorerPress):
    """A scorer press that returns the given scores [B, H, T], for reading what a selector keeps."""
    scores: torch.Tensor = None

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return self.scores


@pytest.mark.parametrize("n_tokens, ratio, chunk_size, seed", [(100, 0.5, 10, 0), (203, 0.8, 10, 1), (64, 0.3, 8, 2),
                                                             (97, 0.9, 5, 3), (400, 0.95, 10, 4),
                                                             (200, 0.05, 10, 5)])  # the last: spiky chunks leave room
def test_eg_chunkkv_keeps_what_kvpress_entropy_gated_chunkkv_keeps(n_tokens, ratio, chunk_size, seed):
    """kvpress's press keeps int(T x (1 - ratio)) tokens and no window: chunkkv's priority with window 0 at
    that budget keeps the same positions (one KV head's scores: kvpress sums over heads)."""
    scores = torch.rand(1, 1, n_tokens, generator=torch.Generator().manual_seed(seed)) ** 4  # some chunks spiky
    press = EntropyGatedChunkKVPress(press=FixedScores(compression_ratio=ratio, scores=scores), chunk_length=chunk_size)
    keys = torch.arange(n_tokens, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 2, -1, 4)  # a key is its position
    module = type("Attention", (), {"head_dim": 4})()
    kept, _ = press.compress(module, None, keys, keys.clone(), None, {})
    budget = int(n_tokens * (1 - ratio))
    ours = chunkkv.top_positions(chunkkv.entropy_gated_priority(scores[0, 0], 0, chunk_size), budget)
    assert kept[0, 0, :, 0].long().tolist() == ours.tolist()
