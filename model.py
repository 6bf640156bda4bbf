"""A single-file Llama (RMSNorm, RoPE, GQA, SwiGLU) whose attention carries a static, compressible KV cache.

Ways to run it:
  model(tokens)                     full-sequence logits [B, T, vocab], no cache involved
  model.prefill(tokens, request)    fills every layer's cache with the compressed prompt KV: last logits [B, vocab]
  model.capture(tokens)             a prefill that keeps each layer's (q, k, v) instead, and
  model.compress(captured, request) fills the caches from it: one prefill, many compressions
  model.extend(tokens)              appends tokens [B, T'] to the caches, returns their logits [B, T', vocab]
  model.decode(token)               one token per sequence through the cache, [B, vocab]
  cache.recompress(config, budget)  a full cache (one of model.caches()) compressed again to `budget` entries
  model.snapshot(), model.restore() the caches' counters and positions, saved and put back (no K/V copy)
  model.drop(n)                     the last n appended tokens taken back

Module names follow Hugging Face's Llama (its state dicts load unrenamed); Llama, Mistral, Qwen2, Qwen3 differ in ModelArgs.
"""
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import chunkkv
from devices import fused_attention, shared_mask_attention, synchronize


class PromptError(ValueError):
    """A prompt or generation setting that cannot be run; the message says how to fix it."""


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    vocab_size: int = 49152  # rows of the embedding; may exceed the tokenizer's token count
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    head_dim: int | None = None  # dim // n_heads unless a checkpoint says otherwise (Mistral Nemo, key_length in GGUF)
    # What the families differ by (Llama 2/3.x, Mistral, Qwen2, Qwen3); the defaults are a plain Llama.
    rope_scaling: str | None = None  # "linear" (Llama 2 long-context fine-tunes) or "llama3" (Llama 3.1/3.2)
    rope_factor: float = 1.0  # both: how many times the pre-training context the frequencies are stretched to
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original context / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original context / this are kept; smooth between
    rope_original_context: int = 8192  # llama3: the pre-training context (original_max_position_embeddings)
    rope_freqs: tuple[float, ...] | None = None  # per-frequency divisors [head_dim/2] (a GGUF's rope_freqs tensor)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE (weights q_norm, k_norm [D])
    sliding_window: int | None = None  # Mistral v0.1, some Qwen2/3: runs are exact only while they fit in it

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads")


@dataclass(frozen=True)
class CacheRequest:
    """What a prefill (or model.compress) keeps of each prompt, and the caches it allocates."""
    config: chunkkv.CompressionConfig
    lengths: list[int]  # each row's prompt length; a shorter row is right-padded to the longest
    budgets: list[list[int]]  # [row][layer] prompt KV entries kept
    max_new_tokens: int  # cache slots left free after the kept entries
    n_slots: int | None = None  # fixed cache size of every layer; default: each layer's need, rounded up to 8
    tokens: Tensor | None = None  # the prompt [B, T]: fastgen reads its special and punctuation tokens
    scores: list[Tensor] | None = None  # precomputed token scores per layer: scoring is skipped
    keep_queries: bool = False  # keep each layer's last `window` queries, so the cache can be re-compressed


class KVCache(nn.Module):
    """One layer's static cache: k, v [B, Hkv, slots, D], rotated; pos [B, Hkv, slots] each slot's RoPE position (-1:
    never attended); each row's counters `used` (slots written), `length` (prompt + appended): [B] tensors, not ints."""
    TENSORS = ("k", "v", "pos", "used", "length", "queries")

    def __init__(self):
        super().__init__()
        self.fills = 0  # refills and re-compressions move K and V: older snapshots cannot be restored
        self.remembers = False  # whether `queries` holds the last `window` queries [B, Hq, W, D]
        self.own_lse = None  # the last eager many-token extend's own log-sum-exps [B, Hq, T'] (KVzip's scorer)
        for name in self.TENSORS:  # plain attributes, not buffers: compile_decode passes them as arguments
            setattr(self, name, None)

    def fill(self, k: Tensor, v: Tensor, positions: Tensor, n_slots: int, lengths: Tensor, used: Tensor):
        """Kept entries k, v [B, Hkv, n, D] at positions [B, Hkv, n] (-1: padding) into slots [0, n) of
        caches of `n_slots`, for prompts of `lengths` [B], `used` [B] slots per row."""
        shape, n_kept = (*k.shape[:2], n_slots, k.shape[3]), k.shape[2]
        for name, size, dtype in [("k", shape, k.dtype), ("v", shape, k.dtype), ("pos", shape[:3], torch.int32),
                                  ("used", shape[:1], used.dtype), ("length", shape[:1], used.dtype)]:
            self.allocate(name, size, dtype, k.device)
        self.k[:, :, :n_kept], self.v[:, :, :n_kept] = k, v
        self.pos.fill_(-1)[:, :, :n_kept] = positions  # -1 past the kept entries: nothing to attend
        self.used.copy_(used)
        self.length.copy_(lengths)
        self.fills += 1

    def allocate(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Tensor `name`, new zeros only if it had another shape, dtype or device: same-size calls reuse it."""
        if (t := getattr(self, name)) is None or (t.shape, t.dtype, t.device) != (shape, dtype, device):
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        return getattr(self, name)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v [B, Hkv, T', D] of new tokens at each row's next slots, advance the counters; the whole
        k, v and the mask [B, Hkv, T', slots]: each new token sees the entries at positions up to its own."""
        new = torch.arange(n_new := k.shape[2], device=k.device)
        slots, positions = self.used[:, None] + new, self.length[:, None] + new  # [B, T']
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
        # index_put_ (values [B, T', Hkv, D]), not scatter_: Inductor writes it in place, a scatter_ copied the cache
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)
        self.pos[rows, :, slots] = positions[..., None].to(self.pos.dtype)
        mask = (self.pos[:, :, None, :] >= 0) & (self.pos[:, :, None, :] <= positions[:, None, :, None])
        self.used.add_(n_new)
        self.length.add_(n_new)
        return self.k, self.v, mask

    def snapshot(self) -> tuple:
        """(fill count, used, length, pos, queries if it remembers), copied; K and V are not."""
        own = (self.used, self.length, self.pos, self.queries if self.remembers else None)
        return (self.fills, *(None if t is None else t.clone() for t in own))

    def restore(self, state: tuple):
        """Back to a snapshot of the same fill, in place: what was appended since stays, masked."""
        if state[0] != self.fills:
            raise ValueError("the cache was refilled or re-compressed since this snapshot: compress the context again")
        for mine, saved in zip((self.used, self.length, self.pos, self.queries), state[1:]):
            if saved is not None:
                mine.copy_(saved)

    def drop(self, n: int):
        """Take back each row's last `n` appended tokens (decode steps run past the stop): freed and masked."""
        slots = self.used.sub_(n)[:, None, None] + torch.arange(n, device=self.pos.device)  # [B, 1, n]
        self.pos.scatter_(2, slots.expand(-1, self.pos.shape[1], -1), -1)
        self.length.sub_(n)

    def keep_queries(self, q: Tensor | None, window: int):
        """Start the query buffer [B, Hq, window, D] from the prompt's q [B, Hq, T, D], right-aligned
        (zeros before a shorter prompt); None: remember none (no re-compression), buffer kept."""
        self.remembers, self.own_lse = q is not None, None
        if q is not None:
            queries = self.allocate("queries", (q.shape[0], q.shape[1], window, q.shape[3]), q.dtype, q.device).zero_()
            queries[:, :, window - min(window, q.shape[2]):] = q[:, :, -window:]

    def remember(self, q: Tensor):
        """Shift the queries q [B, Hq, T', D] of appended tokens into the buffer, in place."""
        self.queries.copy_(torch.cat([self.queries, q], dim=2)[:, :, -self.queries.shape[2]:])

    @torch.no_grad()
    def recompress(self, config: chunkkv.CompressionConfig, budget: int, n_new: int = 1) -> bool:
        """Make room for `n_new` tokens: each row that cannot take them keeps `budget` entries (whether
        any did), chosen by chunkkv.recompress_slots and moved to slots [0, budget), positions unchanged."""
        n_slots = self.k.shape[2]
        if not self.remembers:
            raise ValueError("this cache keeps no queries to score with: prefill with keep_queries=True")
        if n_new > n_slots - budget:
            raise ValueError(f"{n_new} new tokens do not fit beside the {budget} entries re-compression keeps "
                             f"in {n_slots} slots: append fewer tokens at a time, or raise the cache budget")
        full = [(row, n_used) for row, n_used in enumerate(self.used.tolist()) if n_used + n_new > n_slots]
        for row, n_used in full:
            slots = chunkkv.recompress_slots(config, self.queries[row:row + 1], self.k[row:row + 1, :, :n_used],
                                             budget)[0].expand(self.k.shape[1], -1)  # [Hkv, N]
            n_kept, index = slots.shape[-1], slots[..., None].expand(-1, -1, self.k.shape[3])
            self.k[row, :, :n_kept] = self.k[row].gather(1, index)  # gather copies first: safe in place
            self.v[row, :, :n_kept] = self.v[row].gather(1, index)
            self.pos[row] = F.pad(self.pos[row].gather(1, slots), (0, n_slots - n_kept), value=-1)
            self.used[row] = n_kept
        self.fills += bool(full)
        return bool(full)


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies [D/2] in float32, theta^(-2i/D), scaled for long contexts as `args` say:
    linear divides every one by rope_factor; llama3 is Llama 3.1's rule (Meta's llama-models,
    transformers' modeling_rope_utils); rope_freqs divides each by its own factor (llama.cpp)."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    if args.rope_scaling == "linear":
        inv_freq = inv_freq / args.rope_factor
    elif args.rope_scaling == "llama3":
        # 0 above wavelength original / low (stretched), 1 below original / high (kept), linear in 1 / wavelength
        wavelen = 2 * math.pi / inv_freq
        low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
        smooth = ((args.rope_original_context / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
    if args.rope_freqs is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freqs, device=device)
    return inv_freq


def rope(positions: Tensor, args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos, sin [*positions.shape, D] in float32 for the rotate-half RoPE layout."""
    angles = (positions.float()[..., None] * rope_inv_freq(args, positions.device)).tile(2)  # [..., D/2] twice
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D], cos/sin [T, D] or [B, 1, T, D]: rotate pairs (i, i + D/2) by their position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ((x32 := x.float()) * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Linear(nn.Linear):
    """nn.Linear; one row on the CPU in a compiled graph (batch-1 decode) is a fused multiply-and-sum (docs/results.md)."""
    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and x.is_cpu and x.numel() == x.shape[-1]:  # checks at trace time
            y = (x[..., None, :] * self.weight).sum(-1, dtype=torch.float32).to(x.dtype)  # [..., N]
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()  # Identity: no weights
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()
        self.cache = KVCache()

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_batch, n_tokens, _ = x.shape
        q = self.q_proj(x).view(n_batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(n_batch, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(n_batch, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin), v  # norms over D, per head

    def out(self, y: Tensor) -> Tensor:
        return self.o_proj(y.transpose(1, 2).flatten(2))  # [B, Hq, T, D] -> [B, T, Hq*D]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Causal attention over the whole (uncompressed) sequence; also its (q, k, v)."""
        q, k, v = self.qkv(x, cos, sin)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), (q, k, v)

    def extend(self, x: Tensor, cos: Tensor, sin: Tensor, attend: bool = True) -> Tensor | None:
        """New tokens x [B, T', dim] appended to the cache; each attends to the cache entries up to its own
        position (attend=False: none do, None is returned). cos/sin [B, 1, T', D] per row."""
        q, k, v = self.qkv(x, cos, sin)
        if self.cache.remembers:  # a Python check: each case compiles once
            self.cache.remember(q)
        k_all, v_all, mask = self.cache.update(k, v)
        n_batch, _, n_new, _ = q.shape
        if not attend:
            return None
        if n_new > 1 and bool((self.cache.pos == self.cache.pos[:, :1]).all()):  # eager only: host syncs
            y, self.cache.own_lse = shared_mask_attention(q, k_all, v_all, mask[:, 0], self.cache.used)
            return self.out(y)
        group = self.n_heads // self.n_kv_heads
        # a KV head's query heads as extra query rows: its K/V read once per KV head (docs/results.md, Speed)
        q = q.reshape(n_batch, self.n_kv_heads, group * n_new, self.head_dim)  # [B, Hkv, G*T', D]
        mask = mask.repeat(1, 1, group, 1)  # [B, Hkv, G*T', slots], rows in q's (G, T') order
        if torch.compiler.is_compiling() and q.is_cpu:  # matmuls, as transformers' eager attention: 1.6x SDPA at 8k
            scores = (q @ k_all.transpose(-1, -2)).float() / self.head_dim ** 0.5  # [B, Hkv, G*T', slots]
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v_all.dtype) @ v_all
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(y.view(n_batch, self.n_heads, n_new, self.head_dim))


@torch.compiler.disable  # data-dependent selection, timed: eager even inside a compiled prefill
def compress_layer(cache: KVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, request: CacheRequest,
                   leaders: list | None) -> tuple[list, float]:
    """Fill one layer's cache with what `request` keeps of its prompt q, k, v [B, H, T, D]: (the reuse leaders
    for the next layers, seconds spent). Rows of one length are selected together; in a ragged batch each
    row's real tokens alone, as a batch of one (padding is never scored or kept), positions padded with -1."""
    synchronize(k.device)  # bill the queued prefill to the prefill, not to compression
    start = time.perf_counter()
    config, lengths = request.config, request.lengths
    parts = [range(len(lengths))] if len(set(lengths)) == 1 else [range(row, row + 1) for row in range(len(lengths))]
    kept, new_leaders = [], []
    for i, rows in enumerate(parts):
        n_prompt, rows = lengths[rows[0]], slice(rows[0], rows[-1] + 1)
        scores, tokens = (None if t is None else t[rows, ..., :n_prompt]
                          for t in (request.scores[layer] if request.scores else None, request.tokens))
        q_rows = None if q is None else q[rows, :, :n_prompt]  # None: the request's scores are all it needs
        positions, scores = chunkkv.keep_positions(config, q_rows, k[rows, :, :n_prompt],
                                                   request.budgets[rows.start][layer], layer,
                                                   leaders[i] if leaders else None, scores, tokens)
        if positions.dim() == 2:
            positions = positions[:, None].expand(-1, k.shape[1], -1)  # [B, Hkv, N]: one choice for every head
        kept.append((positions, *chunkkv.gather_kv(k[rows], v[rows], positions)))
        new_leaders.append((positions if config.per_kv_head else positions[:, 0], scores))
    n_kept = max(p.shape[-1] for p, _, _ in kept)
    pad = lambda t, value=0: F.pad(t, (0, 0) * (t.dim() - 3) + (0, n_kept - t.shape[2]), value=value)  # noqa: E731
    positions = torch.cat([pad(p, -1) for p, _, _ in kept])  # [B, Hkv, N]
    k_kept, v_kept = (torch.cat([pad(part[i]) for part in kept]) for i in (1, 2))  # [B, Hkv, N, D]
    n_slots = request.n_slots or -(-(n_kept + request.max_new_tokens) // 8) * 8  # multiple of 8: fewer sizes
    if n_slots < n_kept + request.max_new_tokens:
        raise PromptError(f"a cache of {n_slots} slots cannot hold {n_kept} prompt entries + "
                          f"{request.max_new_tokens} new tokens: raise n_slots or lower max_new_tokens")
    used = torch.tensor([p.shape[-1] for p, _, _ in kept for _ in range(p.shape[0])], device=k.device)
    cache.fill(k_kept, v_kept, positions, n_slots, torch.tensor(lengths, device=k.device), used)
    cache.keep_queries(q if request.keep_queries else None, config.window)
    synchronize(k.device)
    return (new_leaders if layer % config.reuse == 0 else leaders), time.perf_counter() - start


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        y, qkv = self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x)), qkv

    def extend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn.extend(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def check_room(self, n_tokens: int, what: str, fix: str = "shorten the prompt"):
        """Raise PromptError, naming `what` and the `fix`, when `n_tokens` logical positions pass the model's
        context or sliding window (sliding-window attention equals full only while every token sees all)."""
        if n_tokens > self.args.max_seq_len:
            raise PromptError(f"{what} exceeds the model's context of {self.args.max_seq_len}: {fix}")
        if self.args.sliding_window is not None and n_tokens > self.args.sliding_window:
            raise PromptError(f"{what} exceeds the model's sliding window of {self.args.sliding_window}: chunkkv "
                              f"runs sliding-window models only within the window; {fix}")

    def check_attention_memory(self, n_batch: int, n_tokens: int):
        """Raise PromptError before a prefill only SDPA's math kernel can run (not fused_attention: e.g. float16
        below compute capability 8.0) if its float32 scores and softmax, 8 x B x Hq x T x T bytes, exceed free memory."""
        w, need = self.embed_tokens.weight, 8 * n_batch * self.args.n_heads * n_tokens ** 2
        if not fused_attention(n_batch, self.args, w) and need > (free := torch.cuda.mem_get_info(w.device)[0]):
            raise PromptError(f"attention over {n_batch} x {n_tokens} prompt tokens needs {need / 2 ** 30:.1f} GiB, "
                              f"{free / 2 ** 30:.1f} GiB are free (only SDPA's math kernel runs this dtype on this "
                              "GPU): shorten the prompt or batch fewer prompts")

    def start(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.check_room(tokens.shape[1], f"a prompt of {tokens.shape[1]} tokens")
        self.check_attention_memory(*tokens.shape)
        return self.embed_tokens(tokens), *rope(torch.arange(tokens.shape[1], device=tokens.device), self.args)

    def forward(self, tokens: Tensor) -> Tensor:
        """Full-sequence logits [B, T, vocab] for tokens [B, T]; no cache is read or written."""
        x, cos, sin = self.start(tokens)
        for block in self.layers:
            x, _ = block(x, cos, sin)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def prefill(self, tokens: Tensor, request: CacheRequest) -> tuple[Tensor, float]:
        """Run the prompt [B, T] and compress each layer's KV into its cache as `request` says:
        (logits of each row's last token [B, vocab], seconds spent compressing)."""
        x, cos, sin = self.start(tokens)
        leaders, seconds = None, 0.0
        for layer, block in enumerate(self.layers):
            x, (q, k, v) = block(x, cos, sin)
            leaders, spent = compress_layer(block.self_attn.cache, layer, q, k, v, request, leaders)
            seconds += spent
        return self.last_logits(x, request.lengths), seconds

    @torch.no_grad()
    def capture(self, tokens: Tensor) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """A prefill that touches no cache: (last logits [B, vocab], each layer's (q, k, v))."""
        x, cos, sin = self.start(tokens)
        captured = []
        for block in self.layers:
            x, qkv = block(x, cos, sin)
            captured.append(qkv)
        return self.last_logits(x, [tokens.shape[1]] * tokens.shape[0]), captured

    @torch.no_grad()
    def compress(self, captured: list[tuple[Tensor, Tensor, Tensor]], request: CacheRequest) -> float:
        """Fill the caches from a captured prefill (which no method or budget changes); seconds spent."""
        start = time.perf_counter()
        if request.config.global_budget and request.scores:  # one ranking over every layer's scores
            request = replace(request, scores=chunkkv.global_scores(request.config, request.scores, request.budgets[0]))
        leaders, seconds = None, time.perf_counter() - start
        for layer, (block, (q, k, v)) in enumerate(zip(self.layers, captured)):
            leaders, spent = compress_layer(block.self_attn.cache, layer, q, k, v, request, leaders)
            seconds += spent
        return seconds

    def last_logits(self, x: Tensor, lengths: list[int]) -> Tensor:
        last = torch.tensor(lengths, device=x.device) - 1
        return self.lm_head(self.norm(x[torch.arange(x.shape[0], device=x.device), last]))

    def caches(self) -> list[KVCache]:
        return [block.self_attn.cache for block in self.layers]

    def cache_tensors(self) -> list[tuple]:
        """Each layer's cache tensors (KVCache.TENSORS), as compile_decode passes them to its step."""
        return [tuple(getattr(cache, name) for name in KVCache.TENSORS) for cache in self.caches()]

    def bind_caches(self, tensors: list[tuple]):
        """Each layer's cache reads and writes these tensors (from cache_tensors) from now on."""
        for cache, own in zip(self.caches(), tensors):
            for name, t in zip(KVCache.TENSORS, own):
                setattr(cache, name, t)

    def free_slots(self) -> int:
        """Cache slots left in the fullest row of any layer (a host sync: not inside decode)."""
        return min(cache.k.shape[2] - int(cache.used.max()) for cache in self.caches())

    def kept_positions(self, lengths: list[int]) -> list[Tensor]:
        """Each layer's kept prompt positions [B, Hkv, N], sorted (-1 where a head or row keeps fewer)."""
        end = torch.tensor(lengths, device=self.embed_tokens.weight.device)[:, None, None]
        kept = []
        for cache in self.caches():
            prompt = (cache.pos >= 0) & (cache.pos < end)  # prompt entries fill each row's first slots
            n_kept = int(prompt.sum(-1).max())
            kept.append(cache.pos[..., :n_kept].masked_fill(~prompt[..., :n_kept], -1).long())
        return kept

    def slot_bytes(self) -> int:
        """Bytes of one cache slot of one row in one layer: K and V of every KV head, and their positions."""
        return self.args.n_kv_heads * (2 * self.args.head_dim * self.embed_tokens.weight.element_size() + 4)  # pos: int32

    def cache_bytes(self) -> int:
        """Bytes every layer's cache buffers hold now, slots for new tokens included."""
        return sum(c.pos.shape[0] * c.pos.shape[2] for c in self.caches()) * self.slot_bytes()

    @torch.no_grad()
    def extend(self, tokens: Tensor, logits: bool = True) -> Tensor | None:
        """Append tokens [B, T'] to the caches in one forward: logits [B, T', vocab] (None if not `logits`).
        Each attends to every cache entry and causally to the new tokens before it, at RoPE positions from
        the logical length (never the slot index); their K/V take the next free slots. Raises PromptError
        when a layer has fewer free slots than T', or the model's context or window would overflow."""
        if (n_new := tokens.shape[1]) > (free := self.free_slots()):
            raise PromptError(f"{n_new} new tokens do not fit in the {free} free cache slots: "
                              f"leave more room for new tokens (max_new_tokens) when compressing")
        length = int(self.caches()[0].length.max())
        self.check_room(length + n_new, f"{length} tokens in the cache + {n_new} new tokens", "append fewer tokens")
        return self.lm_head(self.through_cache(tokens)) if logits else self.through_cache(tokens, caches_only=True)

    @torch.no_grad()
    def decode(self, token: Tensor) -> Tensor:
        """token [B, 1] appended like `extend`, without its checks or host syncs (one graph): logits [B, vocab]."""
        return self.lm_head(self.through_cache(token)[:, -1])

    def through_cache(self, tokens: Tensor, caches_only: bool = False) -> Tensor | None:
        positions = self.caches()[0].length[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, T']
        cos, sin = (t[:, None] for t in rope(positions, self.args))  # [B, 1, T', D]
        x = self.embed_tokens(tokens)
        for block in self.layers[:-1] if caches_only else self.layers:
            x = block.extend(x, cos, sin)
        if caches_only:  # the last layer's attention and MLP would only feed the logits
            return self.layers[-1].self_attn.extend(self.layers[-1].input_layernorm(x), cos, sin, attend=False)
        return self.norm(x)

    def snapshot(self) -> list[tuple]:
        """Every layer's counters and positions (no K/V), e.g. right after compression, for `restore`."""
        return [cache.snapshot() for cache in self.caches()]

    def drop(self, n: int):
        """Take back every row's last `n` appended tokens in every layer (KVCache.drop)."""
        for cache in self.caches():
            cache.drop(n)

    def restore(self, snapshot: list[tuple]):
        """Every layer's cache back to `snapshot`, in place; ValueError if a prefill or re-compression ran since."""
        for cache, state in zip(self.caches(), snapshot):
            cache.restore(state)
