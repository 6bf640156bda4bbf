"""chunkkv's selection inside Hugging Face transformers: a kvpress press, and a recipe for a plain
DynamicCache without kvpress. Any chunkkv method, on transformers models with Llama-style attention
modules (checked: Llama, Mistral, Qwen2, Qwen3, Phi3), on any device map.

Needs the `hf` extra (`pip install -e ".[hf]"`: kvpress, transformers); the recipe needs transformers
only. The library never imports this file. docs/integrations.md shows both in use.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

import chunkkv

try:  # the press needs kvpress; prefill_compressed needs transformers only
    from kvpress import BasePress
    from kvpress.utils import compute_n_kept
except ImportError:
    BasePress = object


def queries(attn, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor], n: int) -> Tensor:
    """The last n post-RoPE queries of a transformers attention layer, [B, Hq, n, D], computed as the
    layer computes its own from its input hidden_states [B, T, dim] and (cos, sin) [B, T, D]."""
    h = hidden_states[:, -n:]
    n_heads = attn.config.num_attention_heads
    q = attn.q_proj(h) if hasattr(attn, "q_proj") else attn.qkv_proj(h)[..., :n_heads * attn.head_dim]  # Phi3: fused
    q = q.view(*h.shape[:2], n_heads, attn.head_dim).transpose(1, 2)  # [B, Hq, n, D]
    if hasattr(attn, "q_norm"):  # Qwen3: a per-head RMSNorm before RoPE
        q = attn.q_norm(q)
    cos, sin = (t[:, None, -n:] for t in position_embeddings)  # [B, 1, n, D]
    return q * cos + rotate_half(q) * sin


def compress_kv(config: chunkkv.CompressionConfig, attn, kwargs: dict, keys: Tensor, values: Tensor, budget: int,
                leader: tuple | None = None, tokens: Tensor | None = None) -> tuple[Tensor, ...]:
    """One attention layer's prompt keys, values [B, Hkv, T, D] (post-RoPE, as its cache holds them)
    compressed by chunkkv.keep_positions to `budget` per row: (keys, values [B, Hkv, N, D], positions
    [B, N] or [B, Hkv, N], scores). kwargs: the layer's call (hidden_states, position_embeddings).
    `leader`: the last scoring layer's (positions, scores), for layer-wise reuse."""
    layer, row = attn.layer_idx, config.row
    reusing = leader is not None and layer % config.reuse != 0
    n_queries = keys.shape[2] if row.all_queries else min(config.window, keys.shape[2])
    q = None if reusing or row.score is None else queries(attn, kwargs["hidden_states"],
                                                          kwargs["position_embeddings"], n_queries)
    if leader is not None:  # device_map="auto": the leader may sit on another GPU
        leader = tuple(None if t is None else t.to(keys.device) for t in leader)
    positions, scores = chunkkv.keep_positions(config, q, keys, budget, layer, leader, tokens=tokens)
    return (*chunkkv.gather_kv(keys, values, positions), positions, scores)


@dataclass
class ChunkKVPress(BasePress):
    """Any chunkkv method as a kvpress press, as chunkkv's own model runs it: per batch row (rows of
    one length, as kvpress runs them), the window always kept, exactly kvpress's budget
    (compute_n_kept: int(T * (1 - compression_ratio))) per layer on average, layer-wise reuse.
    Budgets of `window` or less follow CompressionConfig's host rule. fastgen's heads keep different
    counts: the padding is masked through kvpress's masked_key_indices."""
    method: str = "chunkkv"  # a key of chunkkv.METHODS
    compression_ratio: float = 0.0  # kvpress's knob: the fraction removed (chunkkv's keep is 1 - this)
    window: int = 32  # the observation window, always kept
    chunk_size: int = 10  # chunkkv: tokens per chunk
    reuse: int = 1  # layer-wise index reuse depth (the paper: 2)
    per_head: bool = False  # chunkkv: chunks per KV head
    options: dict = field(default_factory=dict)  # any other CompressionConfig field: n_sinks, pool_kernel, ...

    def __post_init__(self):
        if BasePress is object:
            raise ImportError("ChunkKVPress is a kvpress press: pip install kvpress (the hf extra)")
        assert 0 <= self.compression_ratio < 1, "compression_ratio is the fraction removed, in [0, 1)"
        self.leader = self.tokens = None
        self.config()  # a bad setting fails here, not in the middle of a forward

    def config(self, n_prompt: int = 1) -> chunkkv.CompressionConfig:
        """chunkkv's settings for a prompt of n_prompt tokens: kvpress's budget, the host rule."""
        return chunkkv.CompressionConfig(self.method, budget=compute_n_kept(n_prompt, self.compression_ratio),
                                         window=self.window, chunk_size=self.chunk_size, reuse=self.reuse,
                                         per_head=self.per_head, host=True, **self.options)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        config, layer = self.config(keys.shape[2]), module.layer_idx
        budget = config.layer_budgets(keys.shape[2], module.config.num_hidden_layers)[layer]
        keys, values, positions, scores = compress_kv(config, module, kwargs, keys, values, budget,
                                                      self.leader, self.tokens)
        if layer % config.reuse == 0:
            self.leader = (positions, scores)
        if positions.dim() == 3 and (positions < 0).any():  # fastgen's padding: masked when decoding
            module.masked_key_indices = torch.nonzero(positions < 0, as_tuple=True)
        return keys.contiguous(), values.contiguous()

    @contextmanager
    def __call__(self, model):
        # fastgen reads the prompt's token ids, which attention layers never see: catch them on the way in
        def catch(module, args, kwargs):
            self.tokens = kwargs.get("input_ids", args[0] if args else None)  # [B, T]

        hook = model.model.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with super().__call__(model):
                yield
        finally:
            hook.remove()


@torch.no_grad()
def prefill_compressed(model, input_ids: Tensor, config: chunkkv.CompressionConfig) -> tuple[DynamicCache, Tensor]:
    """The recipe without kvpress: prefill input_ids [B, T] through a transformers causal LM into a
    DynamicCache compressed as `config` says (chunkkv's own budget rules and refusals, reuse included);
    (cache, last logits [B, vocab]). The cache then holds fewer entries than the T positions it
    covers, so continue with explicit positions: model(ids, past_key_values=cache,
    position_ids=torch.arange(T, T + n)[None]). Per-layer budgets (pyramidkv) need one token per step
    under sdpa (no mask to build). fastgen needs a masking cache: use ChunkKVPress."""
    if config.method == "fastgen":
        raise chunkkv.CompressionError("fastgen keeps different counts per head: use ChunkKVPress")
    cache, leader = DynamicCache(), [None]
    budgets = config.layer_budgets(input_ids.shape[1], model.config.num_hidden_layers)

    def compress(attn, args, kwargs, output):
        layer = cache.layers[attn.layer_idx]
        layer.keys, layer.values, positions, scores = compress_kv(config, attn, kwargs, layer.keys, layer.values,
                                                                  budgets[attn.layer_idx], leader[0], input_ids)
        if attn.layer_idx % config.reuse == 0:
            leader[0] = (positions, scores)

    hooks = [block.self_attn.register_forward_hook(compress, with_kwargs=True) for block in model.model.layers]
    try:
        return cache, model(input_ids, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
