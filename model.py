"""A single-file Llama (RMSNorm, RoPE, GQA, SwiGLU) whose attention carries a static,
compressible KV cache.

Ways to run it:
  model(tokens)                     full-sequence logits [B, T, vocab], no cache involved
  model.prefill(tokens, prefill)    fills every layer's cache with the compressed prompt KV,
                                    returns the last position's logits [B, vocab]
  model.compress(captured, prefill) refills the caches from a captured prefill, compressed anew
  model.extend(tokens)              appends tokens [B, T'] to the caches, returns their logits [B, T', vocab]
  model.decode(token)               one token per sequence through the cache, [B, vocab]
  model.recompress(config, budget)  full caches compressed again, in place, to `budget` entries
  model.snapshot(), model.restore() the caches' counters and masks, saved and put back (no K/V copy)

Module names follow Hugging Face's Llama, so its state dicts load without renaming. Llama, Mistral
and Qwen2 checkpoints all run on it: they differ only in ModelArgs fields.
"""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import chunkkv


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
    # What the families differ by (Llama 2/3.x, Mistral, Qwen2); the defaults are a plain Llama.
    rope_scaling: str | None = None  # "linear" (Llama 2 long-context fine-tunes) or "llama3" (Llama 3.1/3.2)
    rope_factor: float = 1.0  # both: how many times the pre-training context the frequencies are stretched to
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original context / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original context / this are kept; smooth between
    rope_original_context: int = 8192  # llama3: the pre-training context (original_max_position_embeddings)
    rope_freqs: tuple[float, ...] | None = None  # per-frequency divisors [head_dim/2] (a GGUF's rope_freqs tensor)
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    sliding_window: int | None = None  # Mistral v0.1, some Qwen2: runs are exact only while they fit in it

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split evenly over {self.n_kv_heads} KV heads")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**CONFIGS[name])


CONFIGS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=1024),
    "smollm2-135m": dict(),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                       rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False),
}


@dataclass
class Prefill:
    """One prefill's compression: what to do, and what each layer did."""
    config: chunkkv.CompressionConfig
    tokens: Tensor  # the prompt [B, T]: fastgen reads its special and punctuation tokens
    budgets: list[int]  # prompt KV entries each layer keeps
    max_new_tokens: int  # cache slots left free for generated tokens
    n_slots: int | None = None  # fixed cache size per layer; default: each layer's need, rounded up to 8
    leader: tuple | list | None = None  # (positions, scores) of the latest reuse leader (ragged: one per row)
    scores: list[Tensor] | None = None  # precomputed token scores per layer: scoring is skipped
    captured: list[tuple] | None = None  # a list to receive each layer's (q, k, v), for model.compress
    # ragged batch: tokens are right-padded; each row is compressed alone, as its own batch of one
    lengths: list[int] | None = None  # each row's prompt length (its real tokens are tokens[row, :length])
    row_budgets: list[list[int]] | None = None  # [row][layer] prompt KV entries kept; `budgets` is then unused
    keep_queries: bool = False  # keep each layer's last `window` queries, so the cache can be re-compressed
    kept: list[float] = field(default_factory=list)  # prompt entries kept per layer (mean over KV heads and rows)
    stored: list[float] = field(default_factory=list)  # prompt slots used per layer (largest head's count; mean over rows)
    compress_seconds: float = 0.0  # scoring + selection + gather, all layers


class KVCache(nn.Module):
    """Static per-layer cache [B, Hkv, slots, D]: the kept prompt entries fill slots [0, n),
    every token appended after them (extend, decode) takes the next free slot. Keys are stored
    rotated at their original (logical) positions, which are not their slot indices.
    `valid` [B, Hkv, slots] marks what each head may attend to (per-head methods keep
    different counts per head; appended tokens become valid as they are written).

    The cache owns its counters, one per batch row: `used` (slots written) and `length`
    (logical length: prompt tokens + tokens appended since). Code outside asks them."""

    def __init__(self):
        super().__init__()
        self.positions: Tensor | None = None  # kept prompt positions, for inspection only
        self.fills = 0  # how often fill ran: a snapshot of an earlier fill cannot be restored
        self.register_buffer("queries", None, persistent=False)  # last `window` queries [B, Hq, W, D]: for re-compression

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """(Re)allocate only when the size changes: same-size runs reuse the buffers, so a
        compiled decode step sees the same tensors every time."""
        if getattr(self, "k", None) is not None and (self.k.shape, self.k.dtype, self.k.device) == (shape, dtype, device):
            return
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.zeros(shape[:3], dtype=torch.bool, device=device), persistent=False)
        # tensors, not ints: the decode graph reads them without recompiling per value
        self.register_buffer("n_kept", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("used", torch.zeros(shape[0], dtype=torch.long, device=device), persistent=False)
        self.register_buffer("length", torch.zeros(shape[0], dtype=torch.long, device=device), persistent=False)

    def fill(self, k: Tensor, v: Tensor, positions: Tensor, n_slots: int, n_prompt: int | Tensor,
             n_used: Tensor | None = None):
        """Kept prompt entries k, v [B, Hkv, n, D] and their positions [B, n] or [B, Hkv, n]
        (-1 = unused) of an `n_prompt`-token prompt. A ragged batch passes each row's prompt
        length and slots filled as [B] tensors (`n_prompt`, `n_used`): appended tokens then take
        each row's own next slot and position; a shorter row's slots past its own are masked."""
        n_batch, n_kv_heads, n_kept, head_dim = k.shape
        self.allocate((n_batch, n_kv_heads, n_slots, head_dim), k.dtype, k.device)
        self.k[:, :, :n_kept] = k
        self.v[:, :, :n_kept] = v
        used = positions >= 0
        self.valid.zero_()
        self.valid[:, :, :n_kept] = used if used.dim() == 3 else used[:, None]  # per head, or all heads
        self.n_kept.fill_(n_kept)
        self.used.copy_(n_used if n_used is not None else torch.full_like(self.used, n_kept))
        self.length.copy_(torch.as_tensor(n_prompt, device=self.length.device).expand_as(self.length))
        self.positions = positions
        self.anchor = (self.used.clone(), self.length.clone())  # slot_positions: appended slots count on from here
        self.fills += 1

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write k, v [B, Hkv, T', D] of T' new tokens at each row's next free slots and advance
        the counters; return the whole k, v and the attention mask [B, Hkv, T', slots]: each new
        token sees the valid entries and, causally, the new tokens up to itself."""
        n_batch, n_kv_heads, n_new, head_dim = k.shape
        slots = self.used[:, None] + torch.arange(n_new, device=k.device)  # [B, T']
        rows = torch.arange(n_batch, device=k.device)[:, None]  # [B, 1]
        # index_put_, not scatter_: Inductor writes it in place, where a scatter_ into the buffer
        # copied the whole cache every step. Advanced indices first: the values are [B, T', Hkv, D]
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)
        self.valid[rows, :, slots] = True
        slot_ids = torch.arange(self.k.shape[2], device=k.device)
        mask = self.valid[:, :, None, :] & (slot_ids <= slots[:, None, :, None])  # [B, Hkv, T', slots]
        self.used.add_(n_new)
        self.length.add_(n_new)
        return self.k, self.v, mask

    def free_slots(self) -> int:
        """Slots left in the fullest row (a host sync: for checks outside the decode step)."""
        return self.k.shape[2] - int(self.used.max())

    def snapshot(self) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """This cache's state: (fill count, used, length, valid, queries), copied (K and V are not)."""
        queries = self.queries.clone() if self.queries is not None else None
        return self.fills, self.used.clone(), self.length.clone(), self.valid.clone(), queries

    def restore(self, state: tuple[int, Tensor, Tensor, Tensor, Tensor]):
        """Back to a snapshot of the same fill, in place: whatever was appended since stays in
        its slots but is masked, and the next tokens overwrite it. A re-compression counts as
        a fill (it moves K and V)."""
        fills, used, length, valid, queries = state
        if fills != self.fills:
            raise ValueError("the cache was refilled since this snapshot: compress the context again")
        self.used.copy_(used)
        self.length.copy_(length)
        self.valid.copy_(valid)
        if queries is not None:
            self.queries.copy_(queries)

    # -- re-compression: a full cache compressed again, in place (design.md §6) --------------

    def keep_queries(self, q: Tensor | None, window: int):
        """Start the query buffer `queries` [B, Hq, window, D] from the prompt's queries q
        [B, Hq, T, D]: its last `window`, right-aligned (zeros before a shorter prompt). None:
        no buffer (no re-compression; the decode step then skips writing it)."""
        if q is None:
            self.queries = None
            return
        shape = (q.shape[0], q.shape[1], window, q.shape[3])
        if self.queries is None or (self.queries.shape, self.queries.dtype) != (shape, q.dtype):
            self.register_buffer("queries", q.new_zeros(shape), persistent=False)
        last = q[:, :, -window:]
        self.queries.zero_()
        self.queries[:, :, window - last.shape[2]:] = last

    def remember(self, q: Tensor):
        """Shift the queries q [B, Hq, T', D] of appended tokens into the buffer: fixed shapes,
        written in place, so the compiled decode step stays one graph."""
        self.queries.copy_(torch.cat([self.queries, q], dim=2)[:, :, -self.queries.shape[2]:])

    def slot_positions(self) -> Tensor:
        """Logical (RoPE) position of every slot [B, Hkv, slots], -1 where nothing valid is
        stored: the kept entries of the last fill or re-compression, then appended tokens
        counting on from the length at that time."""
        n_batch, n_kv_heads, n_slots = self.valid.shape
        used, length = self.anchor
        slot = torch.arange(n_slots, device=self.valid.device)
        appended = (length[:, None] + slot - used[:, None])[:, None].expand(n_batch, n_kv_heads, n_slots)
        kept = self.positions if self.positions.dim() == 3 else self.positions[:, None].expand(-1, n_kv_heads, -1)
        kept = F.pad(kept, (0, n_slots - kept.shape[-1]), value=-1)
        positions = torch.where(slot < used[:, None, None], kept, appended)
        return positions.masked_fill(~self.valid, -1)

    @torch.no_grad()
    def recompress(self, config: chunkkv.CompressionConfig, budget: int, n_new: int = 1) -> bool:
        """Make room for `n_new` tokens: every row that cannot take them is compressed again, in
        place, to `budget` entries with `config`'s method (chunkkv.recompress_slots: the last
        `window` entries are the window, scored by the last `window` queries this layer saw).
        Kept entries move to slots [0, budget) in their order and keep their RoPE positions:
        nothing is re-rotated. Eager, with host syncs: run it between decode steps. Returns
        whether anything was re-compressed; raises CompressionError for an unsupported method
        and ValueError when `n_new` exceeds the slots left free after re-compression."""
        n_slots = self.k.shape[2]
        if self.queries is None:
            raise ValueError("this cache keeps no queries to score with: prefill with Prefill(keep_queries=True)")
        if n_new > n_slots - budget:
            raise ValueError(f"{n_new} new tokens do not fit beside the {budget} entries re-compression keeps "
                             f"in {n_slots} slots: append fewer tokens at a time, or raise the cache budget")
        full = (self.used + n_new > n_slots).tolist()
        if not any(full):
            return False
        positions = self.slot_positions()
        kept_positions = []
        for row, is_full in enumerate(full):
            n_used = int(self.used[row])
            if is_full:
                slots = chunkkv.recompress_slots(config, self.queries[row:row + 1], self.k[row:row + 1, :, :n_used],
                                                 budget)[0]
                slots = slots.expand(self.k.shape[1], -1) if slots.dim() == 1 else slots  # [Hkv, N]
            else:
                slots = torch.arange(n_used, device=self.k.device).expand(self.k.shape[1], -1)
            n_kept = slots.shape[-1]
            index = slots[..., None].expand(-1, -1, self.k.shape[3])
            self.k[row, :, :n_kept] = self.k[row].gather(1, index)  # gather copies first: safe in place
            self.v[row, :, :n_kept] = self.v[row].gather(1, index)
            valid = self.valid[row].gather(1, slots)
            self.valid[row] = False
            self.valid[row, :, :n_kept] = valid
            self.used[row] = n_kept
            kept_positions.append(positions[row].gather(1, slots).masked_fill(~valid, -1))
        width = max(p.shape[-1] for p in kept_positions)
        self.positions = torch.stack([F.pad(p, (0, width - p.shape[-1]), value=-1) for p in kept_positions])
        self.anchor = (self.used.clone(), self.length.clone())
        self.fills += 1  # K and V moved: an earlier snapshot cannot be restored
        return True


def rope_inv_freq(args: ModelArgs, device: torch.device | None = None) -> Tensor:
    """Inverse frequencies [D/2] in float32, theta^(-2i/D), scaled for long contexts as `args` say:
    linear divides every one by rope_factor; llama3 is Llama 3.1's rule (Meta's llama-models,
    transformers' modeling_rope_utils); rope_freqs divides each by its own factor (llama.cpp)."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim)
    if args.rope_scaling == "linear":
        inv_freq = inv_freq / args.rope_factor
    elif args.rope_scaling == "llama3":
        # 0 for wavelengths longer than original / low_freq_factor (stretched by the factor), 1 for those
        # shorter than original / high_freq_factor (kept), linear in 1 / wavelength between
        wavelen = 2 * math.pi / inv_freq
        low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
        smooth = ((args.rope_original_context / wavelen - low) / (high - low)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / args.rope_factor + smooth * inv_freq
    if args.rope_freqs is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freqs, device=device)
    return inv_freq


def rope(positions: Tensor, args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos, sin [T, D] in float32 for the rotate-half RoPE layout at `positions` [T]."""
    angles = positions.float()[:, None] * rope_inv_freq(args, positions.device)  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D], cos/sin [T, D]: rotate pairs (i, i + D/2) by their position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.cache = KVCache()

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_batch, n_tokens, _ = x.shape
        q = self.q_proj(x).view(n_batch, n_tokens, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(n_batch, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(n_batch, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, y: Tensor) -> Tensor:
        return self.o_proj(y.transpose(1, 2).flatten(2))  # [B, Hq, T, D] -> [B, T, Hq*D]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, prefill: Prefill | None = None) -> Tensor:
        """Causal attention over the whole (uncompressed) sequence; with `prefill`, the layer's
        cache is then filled with the entries compression keeps."""
        q, k, v = self.qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if prefill is not None:
            self.compress_into_cache(q, k, v, prefill)
        return self.out(y)

    @torch.compiler.disable  # data-dependent selection, timed: eager even inside a compiled prefill
    def compress_into_cache(self, q: Tensor, k: Tensor, v: Tensor, prefill: Prefill):
        start = time.perf_counter()
        if prefill.captured is not None:
            prefill.captured.append((q, k, v))
        if prefill.lengths is not None:
            return self.compress_rows(q, k, v, prefill, start)
        scores = prefill.scores[self.layer] if prefill.scores is not None else None
        positions, scores = chunkkv.keep_positions(prefill.config, q, k, prefill.tokens, prefill.budgets[self.layer],
                                                   self.layer, prefill.leader, scores)
        n_stored = positions.shape[-1]
        n_slots = prefill.n_slots or -(-(n_stored + prefill.max_new_tokens) // 8) * 8  # multiple of 8: fewer sizes
        if n_slots < n_stored + prefill.max_new_tokens:
            raise ValueError(f"a cache of {n_slots} slots cannot hold {n_stored} prompt entries "
                             f"+ {prefill.max_new_tokens} new tokens")
        self.cache.fill(*chunkkv.gather_kv(k, v, positions), positions, n_slots, k.shape[2])
        self.cache.keep_queries(q if prefill.keep_queries else None, prefill.config.window)
        if k.is_cuda:
            torch.cuda.synchronize()
        prefill.compress_seconds += time.perf_counter() - start
        if chunkkv.is_reuse_leader(self.layer, prefill.config.reuse):
            prefill.leader = (positions, scores)
        prefill.kept.append((positions >= 0).sum(-1).float().mean().item())
        prefill.stored.append(n_stored)

    def compress_rows(self, q: Tensor, k: Tensor, v: Tensor, prefill: Prefill, start: float):
        """A ragged batch: each row's real tokens [0, length) are scored, selected and gathered
        alone, exactly as a batch of one (padding is never scored or kept); the rows' positions
        are padded with -1 to the longest row's count and the cache masks them."""
        rows, leaders = [], prefill.leader or [None] * len(prefill.lengths)
        for row, n_prompt in enumerate(prefill.lengths):
            row_q, row_k, row_v = (t[row:row + 1, :, :n_prompt] for t in (q, k, v))  # [1, H, T_row, D]
            scores = prefill.scores[self.layer][row:row + 1, ..., :n_prompt] if prefill.scores is not None else None
            positions, scores = chunkkv.keep_positions(prefill.config, row_q, row_k, prefill.tokens[row:row + 1, :n_prompt],
                                                       prefill.row_budgets[row][self.layer], self.layer, leaders[row], scores)
            rows.append((positions, scores, *chunkkv.gather_kv(row_k, row_v, positions)))
        n_stored = max(positions.shape[-1] for positions, *_ in rows)
        positions = torch.cat([F.pad(p, (0, n_stored - p.shape[-1]), value=-1) for p, *_ in rows])  # [B, (Hkv,) N]
        k_kept, v_kept = (torch.cat([F.pad(row[i], (0, 0, 0, n_stored - row[i].shape[2])) for row in rows])
                          for i in (2, 3))  # [B, Hkv, N, D]; the padding slots are masked
        n_slots = prefill.n_slots or -(-(n_stored + prefill.max_new_tokens) // 8) * 8
        if n_slots < n_stored + prefill.max_new_tokens:
            raise ValueError(f"a cache of {n_slots} slots cannot hold {n_stored} prompt entries "
                             f"+ {prefill.max_new_tokens} new tokens")
        n_used = torch.tensor([p.shape[-1] for p, *_ in rows], device=k.device)  # each row's slots, as alone
        self.cache.fill(k_kept, v_kept, positions, n_slots, torch.tensor(prefill.lengths, device=k.device), n_used)
        self.cache.keep_queries(None, prefill.config.window)  # ragged rows are not re-compressed (generate refuses it)
        if k.is_cuda:
            torch.cuda.synchronize()
        prefill.compress_seconds += time.perf_counter() - start
        if chunkkv.is_reuse_leader(self.layer, prefill.config.reuse):
            prefill.leader = [(p, s) for p, s, *_ in rows]
        prefill.kept.append((positions >= 0).sum(-1).float().mean().item())
        prefill.stored.append(n_used.float().mean().item())

    def extend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """New tokens x [B, T', dim] appended to the cache; each attends to the valid cache
        entries and causally to the new tokens before it. cos/sin [B, 1, T', D] per row."""
        q, k, v = self.qkv(x, cos, sin)
        if self.cache.queries is not None:  # a Python check: each case compiles once
            self.cache.remember(q)
        k_all, v_all, mask = self.cache.update(k, v)
        n_batch, _, n_new, _ = q.shape
        group = self.n_heads // self.n_kv_heads
        # a KV head's query heads as extra query rows: its K/V are read once per KV head, and SDPA's
        # CPU kernel is 7-10x faster on one query row of bf16 this way (README, Speed)
        q = q.reshape(n_batch, self.n_kv_heads, group * n_new, self.head_dim)  # [B, Hkv, G*T', D]
        mask = mask.repeat(1, 1, group, 1)  # [B, Hkv, G*T', slots], rows in q's (G, T') order
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(y.view(n_batch, self.n_heads, n_new, self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, prefill: Prefill | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, prefill)
        return x + self.mlp(self.post_attention_layernorm(x))

    def extend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn.extend(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, layer) for layer in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Full-sequence logits [B, T, vocab] for tokens [B, T]; no cache is read or written."""
        return self.lm_head(self.trunk(tokens))

    def trunk(self, tokens: Tensor, prefill: Prefill | None = None) -> Tensor:
        n_tokens = tokens.shape[1]
        if n_tokens > self.args.max_seq_len:
            raise ValueError(f"{n_tokens} tokens exceed the model's context of {self.args.max_seq_len}")
        window, n_new = self.args.sliding_window, prefill.max_new_tokens if prefill is not None else 0
        if window is not None and n_tokens + n_new > window:
            # full attention equals sliding-window attention only while every token sees the whole run
            raise ValueError(f"{n_tokens} tokens + {n_new} new tokens exceed the model's sliding window of {window}: "
                             "chunkkv runs sliding-window models only within the window; shorten the prompt")
        cos, sin = rope(torch.arange(n_tokens, device=tokens.device), self.args)
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x, cos, sin, prefill)
        return self.norm(x)

    def prefill(self, tokens: Tensor, prefill: Prefill) -> Tensor:
        """Run the prompt [B, T], compress it into the caches; logits of its last position [B, vocab]
        (of each row's own last token when `prefill.lengths` gives a right-padded ragged batch)."""
        x = self.trunk(tokens, prefill)
        if prefill.lengths is None:
            return self.lm_head(x[:, -1])
        last = torch.tensor(prefill.lengths, device=tokens.device) - 1
        return self.lm_head(x[torch.arange(tokens.shape[0], device=tokens.device), last])

    def compress(self, captured: list[tuple], prefill: Prefill):
        """Refill the caches from an earlier prefill's captured (q, k, v), compressed as `prefill`
        says: one prefill serves many methods and budgets (the prefill does not depend on them)."""
        for block, (q, k, v) in zip(self.layers, captured):
            block.self_attn.compress_into_cache(q, k, v, prefill)

    def caches(self) -> list[KVCache]:
        return [block.self_attn.cache for block in self.layers]

    def extend(self, tokens: Tensor) -> Tensor:
        """Append tokens [B, T'] to the (compressed) caches in one forward; logits [B, T', vocab].

        Each new token attends to every valid cache entry and causally to the new tokens before
        it; their K/V take the next free slots; their RoPE positions continue from the logical
        length (prompt + tokens appended since), never from the slot index. Raises ValueError
        when a layer's cache has fewer free slots than T' or the model's context would overflow.
        """
        n_new = tokens.shape[1]
        free = min(cache.free_slots() for cache in self.caches())
        if n_new > free:
            raise ValueError(f"{n_new} new tokens do not fit in the {free} free cache slots: "
                             f"leave more room for new tokens (max_new_tokens) when compressing")
        length = int(self.caches()[0].length.max())
        if length + n_new > self.args.max_seq_len:
            raise ValueError(f"{length} + {n_new} tokens exceed the model's context of {self.args.max_seq_len}")
        return self.lm_head(self.through_cache(tokens))

    def decode(self, token: Tensor) -> Tensor:
        """token [B, 1] appended like `extend`, without its checks or host syncs: the step
        torch.compile turns into one graph. Logits [B, vocab]."""
        return self.lm_head(self.through_cache(token)[:, -1])

    def through_cache(self, tokens: Tensor) -> Tensor:
        n_batch, n_new = tokens.shape
        positions = self.caches()[0].length[:, None] + torch.arange(n_new, device=tokens.device)  # [B, T']
        cos, sin = (t.view(n_batch, 1, n_new, -1) for t in rope(positions.flatten(), self.args))  # [B, 1, T', D]
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block.extend(x, cos, sin)
        return self.norm(x)

    def recompress(self, config: chunkkv.CompressionConfig, budget: int, n_new: int = 1) -> bool:
        """Make room for `n_new` tokens in every layer: the caches (rows) that cannot take them are
        compressed again to `budget` entries (KVCache.recompress). Returns whether any was."""
        return any([cache.recompress(config, budget, n_new) for cache in self.caches()])

    def snapshot(self) -> list[tuple]:
        """Every layer's counters and valid mask, e.g. right after compression; `restore` puts
        them back. Nothing appended after the snapshot is copied or kept."""
        return [cache.snapshot() for cache in self.caches()]

    def restore(self, snapshot: list[tuple]):
        """Return every layer's cache to `snapshot` in place (the compiled decode step keeps its
        tensors). Raises ValueError if a prefill or compression ran since the snapshot."""
        for cache, state in zip(self.caches(), snapshot):
            cache.restore(state)
