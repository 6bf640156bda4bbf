"""chunkkv inside Hugging Face transformers (integrations/hf.py), checked against chunkkv's own model
on the same weights: the kvpress press and the DynamicCache recipe keep the same positions in every
layer (and KV head) and give the same next-token logits, to float32 round-off. Tiny random models
built here run in the default suite; SmolLM2 on 2k tokens of real prose is marked `model`. The kept
positions are read off the compressed cache itself: which of the full prompt's keys it holds."""
import pytest
import torch

from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import checkpoint
import registry
from chunkkv import CompressionConfig, CompressionError
from conftest import byte_tokenizer, greedy
from integrations.hf import BasePress, ChunkKVPress, prefill_compressed
from model import CacheRequest

# the recipe needs transformers only and runs everywhere; the press needs kvpress (the hf extra), whose
# transformers pin is older than the test extra's: .ci/run runs these in a second environment with it
needs_kvpress = pytest.mark.skipif(BasePress is object, reason="the press needs kvpress: pip install -e '.[hf]'")

CROSS = [("chunkkv", False), ("chunkkv", True), ("snapkv", False), ("streaming", False), ("pyramidkv", False),
         ("h2o", False)]  # (method, per_head): the four, per-head ChunkKV, and H2O (every query)
RATIOS = (0.9, 0.7)  # kvpress's compression_ratio, the fraction removed: chunkkv's keep 0.1 and 0.3
# float32 round-off between two implementations of one forward, with room: transformers and chunkkv
# already differ on the uncompressed last logits (SmolLM2 on 2k tokens: 1.9e-5; tiny: < ROUND_OFF / 4)
ROUND_OFF = 2e-4


def tiny_pair(tmp_path, n_layers: int = 4, seed: int = 0):
    """A tiny random Llama built by transformers (weights far from its init, so attention is peaked
    and selection is decided well above round-off), and the same weights loaded by chunkkv."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=generator))
    hf.save_pretrained(tmp_path / "hf")
    byte_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    return hf, checkpoint.load(tmp_path / "hf")[0]


def prompts(n_rows: int, n_tokens: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n_rows, n_tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def positions_held(cache: DynamicCache, full_keys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's kept positions [B, Hkv, N]: where in the uncompressed keys [B, Hkv, T, D] each
    entry of the compressed cache comes from (every entry must equal exactly one prompt key)."""
    held = []
    for layer, full in zip(cache.layers, full_keys):
        match = layer.keys[..., :, None, 0] == full[..., None, :, 0]  # [B, Hkv, N, T] on one coordinate first
        if not (match.sum(-1) == 1).all():  # a coordinate shared by two keys: compare whole rows
            match = torch.stack([(layer.keys[row, :, :, None] == full[row, :, None]).all(-1)
                                 for row in range(full.shape[0])])
        assert (match.sum(-1) == 1).all(), "a cache entry that is not exactly one prompt key"
        positions = match.int().argmax(-1)
        index = positions[..., None].expand(-1, -1, -1, full.shape[-1])
        assert torch.equal(full.gather(2, index), layer.keys), "a cache entry that is no prompt key"
        held.append(positions)
    return held


@torch.no_grad()
def pressed(hf, ids: torch.Tensor, press) -> DynamicCache:
    """The cache a prefill of ids [B, T] leaves under the press, as kvpress runs it (its hooks)."""
    cache = DynamicCache()
    with press(hf):
        hf.model(ids, past_key_values=cache)  # the model without its head: no [B, T, vocab] logits
    return cache


@torch.no_grad()
def next_logits(hf, cache: DynamicCache, next_ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """One token [B, 1] through a compressed cache at its true position n_prompt: logits [B, vocab]."""
    return hf(next_ids, past_key_values=cache, position_ids=torch.full_like(next_ids, n_prompt)).logits[:, -1]


@torch.no_grad()
def prefill_both(hf, own, ids: torch.Tensor) -> dict:
    """One uncompressed prefill of ids [B, T] in each implementation: transformers' keys per layer
    (to read kept positions off), what each of its attention layers saw (to replay presses on),
    chunkkv's captured q, k, v, and the next token (greedy, from chunkkv's logits)."""
    cache, seen = DynamicCache(), []
    keep = lambda attn, args, kwargs, out: seen.append(  # noqa: E731
        (attn, kwargs, cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values))
    hooks = [block.self_attn.register_forward_hook(keep, with_kwargs=True) for block in hf.model.layers]
    try:
        hf.model(ids, past_key_values=cache)
    finally:
        for hook in hooks:
            hook.remove()
    own_logits, captured = own.capture(ids)
    return dict(ids=ids, full_keys=[layer.keys for layer in cache.layers], seen=seen, captured=captured,
                next_ids=own_logits.argmax(-1, keepdim=True), own_logits=own_logits)


@torch.no_grad()
def replayed(press, seen: list) -> DynamicCache:
    """kvpress's hook, layer by layer, on a captured prefill (compression never changes the prefill's
    hidden states): press.compress on each layer's own call. One forward serves many presses."""
    cache = DynamicCache()
    for attn, kwargs, keys, values in seen:
        cache.update(*press.compress(attn, kwargs["hidden_states"], keys, values, None, kwargs), attn.layer_idx)
    return cache


@torch.no_grad()
def run_own(own, captured, config: CompressionConfig, n_prompt: int, next_ids: torch.Tensor, tokens=None):
    """chunkkv's own model from a captured prefill: (kept positions [B, Hkv, N] per layer, next logits)."""
    n_batch = next_ids.shape[0]
    own.compress(captured, CacheRequest(config, [n_prompt] * n_batch,
                                        [config.layer_budgets(n_prompt, own.args.n_layers)] * n_batch, 1,
                                        tokens=tokens))
    return own.kept_positions([n_prompt] * n_batch), own.decode(next_ids)


def press_and_config(method: str, per_head: bool, ratio: float, n_prompt: int, **knobs):
    """The press at kvpress's ratio, and chunkkv's own config (its own rules) at the budget kvpress asks."""
    from kvpress.utils import compute_n_kept

    press = ChunkKVPress(method=method, compression_ratio=ratio, per_head=per_head, **knobs)
    return press, CompressionConfig(method, budget=compute_n_kept(n_prompt, ratio), per_head=per_head, **knobs)


def assert_same_as_own(hf, own, prefill: dict, cache: DynamicCache, config: CompressionConfig) -> float:
    """The press's cache holds, in every layer, row and KV head, the positions chunkkv's own model keeps
    with `config`, and the next token's logits agree; returns the largest logit difference."""
    n_prompt = prefill["ids"].shape[1]
    held = positions_held(cache, prefill["full_keys"])
    hf_logits = next_logits(hf, cache, prefill["next_ids"], n_prompt)
    kept, logits = run_own(own, prefill["captured"], config, n_prompt, prefill["next_ids"])
    for layer, (theirs, ours) in enumerate(zip(held, kept)):
        assert torch.equal(theirs, ours), f"{config.method} layer {layer}: the press kept other positions"
    diff = (hf_logits - logits).abs().max().item()
    assert diff < ROUND_OFF, f"{config.method}: next-token logits differ by {diff}"
    return diff


def label(method: str, per_head: bool, ratio: float) -> str:
    return f"{method}{'-per-head' if per_head else ''} keep {1 - ratio:.1f}"


# ---------------------------------------------------------------------------------------
# Tiny random models (default suite)

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def tiny_prefill(pair):
    return prefill_both(*pair, prompts(2, 300))  # two different rows: each keeps its own choice


@needs_kvpress
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method, per_head", CROSS)
def test_the_press_keeps_what_chunkkvs_own_model_keeps(pair, tiny_prefill, method, per_head, ratio):
    hf, own = pair
    press, config = press_and_config(method, per_head, ratio, 300, window=16)
    diff = assert_same_as_own(hf, own, tiny_prefill, pressed(hf, tiny_prefill["ids"], press), config)
    print(f"tiny {label(method, per_head, ratio)}: same positions in every layer, logit diff {diff:.1e}")


@needs_kvpress
@pytest.mark.parametrize("method", ["chunkkv", "pyramidkv"])
def test_layer_wise_reuse_keeps_what_chunkkvs_own_model_keeps(pair, tiny_prefill, method):
    hf, own = pair
    press, config = press_and_config(method, False, 0.8, 300, window=16, reuse=2)
    assert_same_as_own(hf, own, tiny_prefill, pressed(hf, tiny_prefill["ids"], press), config)


@needs_kvpress
@torch.no_grad()
def test_fastgen_through_kvpress_masking_attends_as_chunkkvs_own_cache(pair, tiny_prefill):
    """fastgen's heads keep different counts: the press gathers the largest head's count and kvpress's
    attention patch hides each head's padding; chunkkv's cache masks its -1 slots. Same kept positions
    head by head, same next-token logits."""
    hf, own = pair
    options = dict(recovery=0.7, special_ids=(0, 1), punctuation_ids=(2,))
    press = ChunkKVPress(method="fastgen", window=16, options=options)
    cache = pressed(hf, tiny_prefill["ids"], press)
    held = positions_held(cache, tiny_prefill["full_keys"])
    masked = [block.self_attn.masked_key_indices for block in hf.model.layers]
    hf_logits = next_logits(hf, cache, tiny_prefill["next_ids"], 300)
    config = CompressionConfig("fastgen", window=16, **options)
    kept, logits = run_own(own, tiny_prefill["captured"], config, 300, tiny_prefill["next_ids"], tiny_prefill["ids"])
    for theirs, ours, hidden in zip(held, kept, masked):
        if hidden is not None:
            theirs[hidden] = -1  # the slots kvpress hides
        assert torch.equal(theirs, ours)
    assert any(m is not None for m in masked) and any((k == -1).any() for k in kept)  # uneven heads shown
    assert (hf_logits - logits).abs().max() < ROUND_OFF


@needs_kvpress
@torch.no_grad()
def test_generate_under_the_press_continues_as_chunkkvs_own_generate(pair):
    """kvpress's test_generate: transformers' model.generate keeps counting positions from the prompt,
    so under the press it writes what chunkkv's own model writes from its compressed cache."""
    from kvpress.utils import compute_n_kept

    hf, own = pair
    ids = prompts(1, 200, seed=3)
    config = CompressionConfig("chunkkv", budget=compute_n_kept(200, 0.7), window=16)
    with ChunkKVPress(method="chunkkv", compression_ratio=0.7, window=16)(hf):
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[:, 200:]  # 0 is a token here
    logits = own.prefill(ids, CacheRequest(config, [200], [config.layer_budgets(200, 4)], 12))[0]
    ours, _ = greedy(own, logits, 12)
    assert torch.equal(theirs, ours)


@needs_kvpress
def test_a_replayed_press_leaves_the_cache_its_hooks_leave(pair, tiny_prefill):
    """What the SmolLM2 check below relies on to run one prefill for ten presses."""
    hf, _ = pair
    for method, per_head in CROSS:
        press, _ = press_and_config(method, per_head, 0.7, 300, window=16, reuse=2)
        for a, b in zip(replayed(press, tiny_prefill["seen"]).layers, pressed(hf, tiny_prefill["ids"], press).layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_uncompressed_forwards_agree_to_round_off(pair, tiny_prefill):
    """The yardstick for ROUND_OFF: the two implementations of the same uncompressed forward."""
    hf, own = pair
    with torch.no_grad():
        diff = (hf(tiny_prefill["ids"]).logits[:, -1] - tiny_prefill["own_logits"]).abs().max().item()
    assert diff < ROUND_OFF / 4


@torch.no_grad()
def test_the_dynamic_cache_recipe_needs_its_explicit_positions(pair, tiny_prefill):
    """prefill_compressed (no kvpress) keeps what chunkkv's model keeps; the next token must be fed at
    position T: at the cache's length instead (transformers' default) its logits are far off."""
    hf, own = pair
    config = CompressionConfig("chunkkv", keep=0.2, window=16, reuse=2)
    cache, last = prefill_compressed(hf, tiny_prefill["ids"], config)
    torch.testing.assert_close(last, tiny_prefill["own_logits"], rtol=0, atol=ROUND_OFF)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert_same_as_own(hf, own, tiny_prefill, cache, config)
    for layer, n in zip(cache.layers, lengths):  # roll the cache back, then feed the token without positions
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    _, logits = run_own(own, tiny_prefill["captured"], config, 300, tiny_prefill["next_ids"])
    wrong = hf(tiny_prefill["next_ids"], past_key_values=cache).logits[:, -1]
    print(f"tiny: without position_ids the next logits differ by {(wrong - logits).abs().max():.2f}")
    assert (wrong - logits).abs().max() > 100 * ROUND_OFF


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
@torch.no_grad()
def test_the_press_computes_each_familys_own_queries(family):
    """integrations.hf.queries from a layer's input is the query the layer itself used (Qwen3's q_norm,
    Qwen2's biases, Phi3's fused projection): its attention over the cached keys is transformers' own
    eager attention weights, row for row."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from integrations.hf import queries

    config = AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=256, head_dim=16,
                                  max_position_embeddings=512, attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for name, p in model.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    seen, cache = [], DynamicCache()
    hooks = [block.self_attn.register_forward_hook(lambda attn, args, kwargs, out: seen.append((attn, kwargs)),
                                                   with_kwargs=True) for block in model.model.layers]
    ids = prompts(2, 40)
    attentions = model(ids, past_key_values=cache, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    for (attn, kwargs), weights, layer in zip(seen, attentions, cache.layers):
        q = queries(attn, kwargs["hidden_states"], kwargs["position_embeddings"], 8)  # the last 8
        k = layer.keys.repeat_interleave(2, dim=1)
        logits = q @ k.transpose(-1, -2) / 16 ** 0.5
        causal = torch.arange(40) <= torch.arange(32, 40)[:, None]
        torch.testing.assert_close(logits.masked_fill(~causal, float("-inf")).softmax(-1), weights[:, :, -8:],
                                   rtol=1e-4, atol=1e-5)


def test_the_recipe_keeps_chunkkvs_refusals_and_sends_fastgen_to_the_press(pair):
    hf, _ = pair
    with pytest.raises(CompressionError, match="fewer than the observation window"):
        prefill_compressed(hf, prompts(1, 100), CompressionConfig("chunkkv", keep=0.1))
    with pytest.raises(CompressionError, match="use ChunkKVPress"):
        prefill_compressed(hf, prompts(1, 100), CompressionConfig("fastgen"))


@needs_kvpress
@pytest.mark.skipif(not torch.cuda.is_available(), reason="layers on two devices need a GPU")
def test_the_press_runs_with_layers_on_two_devices(tmp_path):
    """device_map across devices: layer-wise reuse hands layer 0's choice (on the CPU) to layer 1 (on
    the GPU); the result equals the single-device run."""
    from accelerate import dispatch_model

    hf, _ = tiny_pair(tmp_path)
    ids = prompts(2, 300)
    press = ChunkKVPress(method="chunkkv", compression_ratio=0.8, reuse=2)
    reference = [layer.keys for layer in pressed(hf, ids, press).layers]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  **{f"model.layers.{i}": 0 for i in range(1, 4)}, "model.norm": 0, "lm_head": 0}
    split = pressed(dispatch_model(hf, device_map, main_device="cpu"), ids, press)
    assert [layer.keys.device.type for layer in split.layers] == ["cpu", "cuda", "cuda", "cuda"]
    for a, b in zip(split.layers, reference):
        torch.testing.assert_close(a.keys.cpu(), b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# SmolLM2 on 2k tokens of real prose (the cross-check)

@pytest.fixture(scope="module")
def smollm():
    """The default model twice, chunkkv's own and transformers' from the same converted folder, and
    one uncompressed prefill of 2048 tokens of standard-library prose in each."""
    from benchmarks.common import stdlib_paragraphs, take_prose

    own, tokenizer = registry.load()
    hf = AutoModelForCausalLM.from_pretrained(registry.resolve(None), dtype=torch.float32).eval()
    ids = tokenizer.encode("\n".join(take_prose(stdlib_paragraphs(), tokenizer, 2048, 0))).ids[:2048]
    return hf, own, prefill_both(hf, own, torch.tensor([ids]))


@needs_kvpress
@pytest.mark.model
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("method, per_head", CROSS[:5])
def test_smollm2_through_the_press_keeps_what_chunkkv_keeps(smollm, method, per_head, ratio):
    hf, own, prefill = smollm
    press, config = press_and_config(method, per_head, ratio, 2048)
    cache = replayed(press, prefill["seen"])
    if (method, ratio) == ("chunkkv", 0.9):  # once through kvpress's own hooks too
        for a, b in zip(pressed(hf, prefill["ids"], press).layers, cache.layers):
            assert torch.equal(a.keys, b.keys)
    diff = assert_same_as_own(hf, own, prefill, cache, config)
    print(f"smollm2 {label(method, per_head, ratio)}: same positions in all 30 layers, logit diff {diff:.1e}")


@pytest.mark.model
@torch.no_grad()
def test_smollm2_through_the_recipe_keeps_what_chunkkv_keeps(smollm):
    """The DynamicCache recipe (no kvpress: runs in every environment) on the same prompt, with reuse."""
    hf, own, prefill = smollm
    config = CompressionConfig("chunkkv", keep=0.1, reuse=2)
    cache, last = prefill_compressed(hf, prefill["ids"], config)
    assert (last - prefill["own_logits"]).abs().max() < ROUND_OFF
    diff = assert_same_as_own(hf, own, prefill, cache, config)
    print(f"smollm2 recipe chunkkv keep 0.1 reuse 2: same positions in all 30 layers, logit diff {diff:.1e}")
