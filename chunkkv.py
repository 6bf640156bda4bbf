"""ChunkKV: chunk-based KV-cache compression, as small pure functions on tensors.

ChunkKV (Liu et al., NeurIPS 2025) compresses each layer's KV cache once, right after
prefill. The last `window` prompt queries score every prompt token; the prefix before
the window is cut into chunks of `chunk_size` consecutive tokens; the best-scoring
whole chunks are kept (plus the window) until the per-layer budget is full. Keeping
whole chunks instead of scattered tokens keeps phrases, names and numbers intact.

This file depends on torch and einops only: copy it into your own project.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv query heads per KV head,
T prompt tokens, W observation window, D head dim, N kept entries.
"""
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

METHODS = ("full", "streaming", "h2o", "snapkv", "pyramidkv", "chunkkv", "fastgen")
SCORED = ("h2o", "snapkv", "pyramidkv", "chunkkv", "fastgen")  # the methods layer-wise reuse applies to
RECOMPRESSIBLE = ("chunkkv", "snapkv", "streaming")  # the methods that can compress a full cache again


class CompressionError(ValueError):
    """A compression setting that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class CompressionConfig:
    method: str = "chunkkv"
    keep: float = 0.1  # fraction of the prompt's KV entries kept per layer (0.1 keeps 10 %)
    budget: int | None = None  # or an absolute count of prompt entries per layer; wins over keep
    window: int = 32  # observation window: the last prompt tokens, always kept, whose queries score
    chunk_size: int = 10
    reuse: int = 1  # layer-wise index reuse depth: layers l..l+reuse-1 share layer l's selection
    per_head: bool = False  # chunkkv: choose chunks per KV head instead of once per layer
    n_sinks: int = 4  # streaming: attention-sink tokens kept at the start
    pool_kernel: int = 7  # snapkv / pyramidkv: max-pool width along keys
    pyramid_beta: float = 20.0  # pyramidkv: the last layer keeps (budget - window) / beta prefix tokens
    recovery: float = 0.9  # fastgen: attention mass each head's policy must recover
    special_ids: tuple[int, ...] = ()  # fastgen: special-token ids of the tokenizer
    punctuation_ids: tuple[int, ...] = ()  # fastgen: punctuation-token ids of the tokenizer

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressionError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 < self.keep <= 1:
            raise CompressionError(f"keep must be in (0, 1], got {self.keep}: 0.1 keeps 10 % of the prompt")
        if not 0 < self.recovery <= 1:
            raise CompressionError(f"recovery must be in (0, 1], got {self.recovery}: 0.9 keeps 90 % of the attention mass")
        for name in ("window", "chunk_size", "reuse", "pool_kernel", "n_sinks"):
            if getattr(self, name) < 1:
                raise CompressionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pool_kernel % 2 == 0:
            raise CompressionError(f"pool_kernel must be odd so the pooling is centred on each token, "
                                   f"got {self.pool_kernel}: use {self.pool_kernel - 1} or {self.pool_kernel + 1}")
        if not 1 <= self.pyramid_beta < math.inf:  # also refuses nan
            raise CompressionError(f"pyramid_beta must be a finite number of at least 1, got {self.pyramid_beta}: "
                                   f"below 1 the budgets would rise with depth; PyramidKV uses 20")
        if self.method == "streaming" and self.window <= self.n_sinks:
            raise CompressionError(f"streaming keeps {self.n_sinks} sinks plus recent tokens: use a window above {self.n_sinks}")
        if self.budget is not None and self.budget < self.window + 1:
            raise CompressionError(
                f"budget {self.budget} leaves no room beside the observation window ({self.window}): "
                f"use a budget of at least {self.window + 1} or a smaller window")

    @property
    def per_kv_head(self) -> bool:
        """Whether each KV head keeps its own positions ([B, Hkv, N] instead of [B, N])."""
        return self.method in ("h2o", "snapkv", "pyramidkv", "fastgen") or (self.method == "chunkkv" and self.per_head)

    def prompt_budget(self, n_prompt: int) -> int:
        """KV entries kept per layer for a prompt of `n_prompt` tokens, window included
        (for pyramidkv the mean over layers; fastgen chooses its own, at most the prompt)."""
        if self.method in ("full", "fastgen") or n_prompt <= self.window:
            return n_prompt  # nothing to drop, or the whole prompt is the window
        budget = self.budget if self.budget is not None else round(self.keep * n_prompt)
        if budget < self.window + 1:
            raise CompressionError(
                f"keep {self.keep} of a {n_prompt}-token prompt is {budget} KV entries, fewer than the "
                f"observation window ({self.window}) + 1: raise keep, pass a budget of at least "
                f"{self.window + 1}, or use method 'full'")
        return min(budget, n_prompt)

    def layer_budgets(self, n_prompt: int, n_layers: int) -> list[int]:
        """Prompt KV entries kept by each layer."""
        budget = self.prompt_budget(n_prompt)
        if self.method != "pyramidkv" or budget >= n_prompt:
            return [budget] * n_layers
        return pyramid_budgets(budget, self.window, n_layers, self.pyramid_beta, n_prompt)


def pyramid_budgets(budget: int, window: int, n_layers: int, beta: float, n_prompt: int | None = None) -> list[int]:
    """PyramidKV: prefix budgets falling linearly with depth from 2(B-w) - (B-w)/beta down to
    (B-w)/beta, so their mean is B - w; each layer also keeps the window. When the top layer
    would need more than the prompt's T - w prefix tokens, it keeps exactly those and the
    bottom rises to match (as PyramidKV's pyramidkv_utils.py does), so the mean stays B.
    Non-increasing integers within 1 of the exact line, summing to exactly n_layers * budget."""
    if n_layers == 1:
        return [budget]
    prefix = budget - window
    low = Fraction(prefix) / Fraction(beta)  # exact arithmetic: no budget lost or gained to rounding
    high = 2 * prefix - low
    if n_prompt is not None and high > n_prompt - window:
        high = Fraction(n_prompt - window)
        low = 2 * prefix - high
    exact = [high - (high - low) * layer / (n_layers - 1) for layer in range(n_layers)]
    floors = [math.floor(x) for x in exact]
    extra = n_layers * prefix - sum(floors)  # the rounding remainder: +1 for the top layers not already whole
    rounded_up = [layer for layer, (f, x) in enumerate(zip(floors, exact)) if f < x][:extra]
    return [window + f + (1 if layer in rounded_up else 0) for layer, f in enumerate(floors)]


# ---------------------------------------------------------------------------------------
# Scoring: how much the observation window attends to each prompt token.

def window_attention(q_win: Tensor, k: Tensor) -> Tensor:
    """Softmax attention of the last W prompt queries over all T keys, in float32.

    q_win [B, Hq, W, D], k [B, Hkv, T, D] -> [B, Hkv, G, W, T]. Window query i sits at
    position T - W + i and sees keys up to its own position (causal inside the window).
    """
    n_kv_heads, n_prompt, head_dim = k.shape[1], k.shape[2], k.shape[3]
    n_window = q_win.shape[2]
    # group query heads by the KV head they share, so K is never expanded
    q = rearrange(q_win.float(), "b (h g) w d -> b h (g w) d", h=n_kv_heads)
    logits = q @ k.float().transpose(-1, -2) / math.sqrt(head_dim)  # [B, Hkv, G*W, T]
    logits = rearrange(logits, "b h (g w) t -> b h g w t", w=n_window)
    query_pos = torch.arange(n_prompt - n_window, n_prompt, device=k.device)
    visible = torch.arange(n_prompt, device=k.device) <= query_pos[:, None]  # [W, T]
    return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def window_scores(q_win: Tensor, k: Tensor) -> Tensor:
    """ChunkKV's token scores: window attention summed over window queries and all heads, [B, T]."""
    return window_attention(q_win, k).sum(dim=(1, 2, 3))


def head_window_scores(q_win: Tensor, k: Tensor) -> Tensor:
    """Per-KV-head scores: window attention summed over window queries, averaged over the
    query heads of each group, [B, Hkv, T]."""
    return window_attention(q_win, k).sum(dim=3).mean(dim=2)


def snapkv_scores(q_win: Tensor, k: Tensor, kernel: int) -> Tensor:
    """SnapKV: per-KV-head window scores, max-pooled along keys so neighbours of a strong
    token rank high too, [B, Hkv, T]. Window positions are left unpooled (always kept)."""
    scores = head_window_scores(q_win, k)
    prefix = scores[..., :k.shape[2] - q_win.shape[2]]
    pooled = F.max_pool1d(prefix, kernel_size=kernel, stride=1, padding=kernel // 2, ceil_mode=False)
    return torch.cat([pooled[..., :prefix.shape[-1]], scores[..., prefix.shape[-1]:]], dim=-1)


def h2o_scores(q: Tensor, k: Tensor, block: int = 512) -> Tensor:
    """H2O (prefill form): attention every prompt query pays each key, summed over queries and
    averaged over each group's query heads, [B, Hkv, T]. Queries run in blocks of `block`,
    so no T x T matrix is ever held."""
    n_kv_heads, n_prompt, head_dim = k.shape[1], k.shape[2], k.shape[3]
    scores = k.new_zeros(k.shape[0], n_kv_heads, n_prompt, dtype=torch.float32)
    keys = torch.arange(n_prompt, device=k.device)
    for start in range(0, n_prompt, block):
        end = min(start + block, n_prompt)  # queries [start, end) see keys [0, end)
        q_block = rearrange(q[:, :, start:end].float(), "b (h g) t d -> b h (g t) d", h=n_kv_heads)
        logits = q_block @ k[:, :, :end].float().transpose(-1, -2) / math.sqrt(head_dim)  # [B, Hkv, G*t, end]
        logits = rearrange(logits, "b h (g t) s -> b h g t s", t=end - start)
        visible = keys[:end] <= torch.arange(start, end, device=k.device)[:, None]  # [t, end]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        scores[..., :end] += probs.sum(dim=3).mean(dim=2)
    return scores


# ---------------------------------------------------------------------------------------
# Selection: whole chunks in score order until the budget is full, plus the window.

def chunk_scores(token_scores: Tensor, chunk_size: int) -> Tensor:
    """[..., P] -> [..., ceil(P / c)]: summed scores of consecutive chunks (last may be short)."""
    n_tokens = token_scores.shape[-1]
    n_chunks = -(-n_tokens // chunk_size)
    padded = F.pad(token_scores, (0, n_chunks * chunk_size - n_tokens))
    return rearrange(padded, "... (n c) -> ... n c", c=chunk_size).sum(-1)


def select_chunks(token_scores: Tensor, budget: int, window: int, chunk_size: int) -> Tensor:
    """Kept prompt positions [..., budget], sorted, from token scores [..., T].

    Chunks of the prefix [0, T - window) are taken in descending score order (ties: earlier
    chunk first) while they fit into budget - window; the first one that does not fit gives
    its first tokens so that exactly budget - window prefix tokens are kept. The window
    [T - window, T) is always kept. With T <= budget every position is kept.
    """
    *lead, n_prompt = token_scores.shape
    device = token_scores.device
    if n_prompt <= budget:
        return torch.arange(n_prompt, device=device).expand(*lead, n_prompt)
    n_prefix = n_prompt - window
    scores = chunk_scores(token_scores[..., :n_prefix], chunk_size)
    chunk_order = scores.sort(dim=-1, descending=True, stable=True).indices  # stable: ties by position
    chunk_rank = chunk_order.argsort(dim=-1)
    # every prefix token gets its place in the fill order: its chunk's rank, then its offset
    pos = torch.arange(n_prefix, device=device)
    token_chunk_rank = chunk_rank.gather(-1, (pos // chunk_size).expand(*lead, n_prefix))
    fill_order = token_chunk_rank * chunk_size + pos % chunk_size  # [..., n_prefix], unique
    prefix = fill_order.topk(budget - window, dim=-1, largest=False).indices
    window_pos = torch.arange(n_prefix, n_prompt, device=device).expand(*lead, window)
    return torch.cat([prefix, window_pos], dim=-1).sort(dim=-1).values


def select_tokens(token_scores: Tensor, budget: int, window: int) -> Tensor:
    """Token-level selection (H2O, SnapKV, PyramidKV): the budget - window best prefix tokens
    (ties: earlier first) plus the window, [..., budget] sorted, from scores [..., T]."""
    *lead, n_prompt = token_scores.shape
    device = token_scores.device
    if n_prompt <= budget:
        return torch.arange(n_prompt, device=device).expand(*lead, n_prompt)
    n_prefix = n_prompt - window
    order = token_scores[..., :n_prefix].sort(dim=-1, descending=True, stable=True).indices
    window_pos = torch.arange(n_prefix, n_prompt, device=device).expand(*lead, window)
    return torch.cat([order[..., :budget - window], window_pos], dim=-1).sort(dim=-1).values


def streaming_positions(n_batch: int, n_prompt: int, budget: int, n_sinks: int, device=None) -> Tensor:
    """StreamingLLM: the first n_sinks tokens (attention sinks) and the last budget - n_sinks, [B, budget]."""
    if n_prompt <= budget:
        return torch.arange(n_prompt, device=device).expand(n_batch, n_prompt)
    sinks = torch.arange(n_sinks, device=device)
    recent = torch.arange(n_prompt - budget + n_sinks, n_prompt, device=device)
    return torch.cat([sinks, recent]).expand(n_batch, budget)


FASTGEN_POLICIES = ("special", "punctuation", "frequent", "local", "full")


def fastgen_positions(scores: Tensor, tokens: Tensor, config: CompressionConfig,
                      frequent_ratio: float = 0.3, local_ratio: float = 0.3) -> tuple[Tensor, Tensor]:
    """FastGen (prefill form): each KV head takes the cheapest policy of special tokens ->
    + punctuation -> + frequent (heavy hitters) -> + local -> full whose kept set recovers at
    least `config.recovery` of its window attention mass; the window is always kept.

    scores [B, Hkv, T] (window attention), tokens [B, T] -> (positions [B, Hkv, N], policy
    [B, Hkv] indexing FASTGEN_POLICIES). Heads keep different counts: positions are sorted,
    padded with -1 to the largest head's count N.
    """
    n_prompt = tokens.shape[-1]
    device = tokens.device
    pos = torch.arange(n_prompt, device=device)
    window = (pos >= n_prompt - config.window).expand_as(scores)
    special = window | torch.isin(tokens, torch.tensor(config.special_ids, device=device, dtype=tokens.dtype))[:, None]
    punctuation = special | torch.isin(tokens, torch.tensor(config.punctuation_ids, device=device, dtype=tokens.dtype))[:, None]
    n_frequent = max(1, round(frequent_ratio * n_prompt))
    top = scores.topk(n_frequent, dim=-1).indices
    frequent = punctuation | torch.zeros_like(punctuation).scatter_(-1, top, True)
    local = frequent | (pos >= n_prompt - round(local_ratio * n_prompt))
    masks = torch.stack([special, punctuation, frequent, local, torch.ones_like(local)])  # [5, B, Hkv, T]
    recovered = (masks * scores).sum(-1) / scores.sum(-1)  # [5, B, Hkv]
    enough = (recovered >= config.recovery) & (config.recovery < 1)  # 1.0 means: keep everything
    enough[-1] = True
    policy = enough.int().argmax(dim=0)  # the first (cheapest) policy that is enough
    keep = masks.gather(0, policy[None, ..., None].expand(1, *scores.shape))[0]  # [B, Hkv, T]
    n_kept = int(keep.sum(-1).max())  # prefill is eager: a data-dependent size is fine here
    # kept positions first, in order; the rest sort past them and become -1 padding
    order = torch.where(keep, pos, n_prompt + pos).sort(dim=-1).values[..., :n_kept]
    return torch.where(order < n_prompt, order, -1), policy


# ---------------------------------------------------------------------------------------
# One layer: which positions to keep, then gather them.

def is_reuse_leader(layer: int, reuse: int) -> bool:
    """Layer-wise reuse: layer l scores when l % reuse == 0, the others borrow its selection."""
    return layer % reuse == 0


def score(config: CompressionConfig, q: Tensor, k: Tensor) -> Tensor | None:
    """The method's token scores, [B, T] (per layer) or [B, Hkv, T] (per KV head)."""
    q_win = q[:, :, -config.window:]
    if config.method == "chunkkv":
        return head_window_scores(q_win, k) if config.per_head else window_scores(q_win, k)
    if config.method in ("snapkv", "pyramidkv"):
        return snapkv_scores(q_win, k, config.pool_kernel)
    if config.method == "h2o":
        return h2o_scores(q, k)
    if config.method == "fastgen":
        return head_window_scores(q_win, k)
    return None  # full, streaming: no scores


def select(config: CompressionConfig, scores: Tensor | None, tokens: Tensor, budget: int) -> Tensor:
    """Kept positions from scores: [B, N] or [B, Hkv, N], sorted (-1 = unused slot, fastgen)."""
    n_batch, n_prompt = tokens.shape
    if config.method == "streaming":
        return streaming_positions(n_batch, n_prompt, budget, config.n_sinks, tokens.device)
    if config.method == "chunkkv":
        return select_chunks(scores, budget, config.window, config.chunk_size)
    if config.method == "fastgen":
        return fastgen_positions(scores, tokens, config)[0]
    return select_tokens(scores, budget, config.window)


def keep_positions(config: CompressionConfig, q: Tensor, k: Tensor, tokens: Tensor, budget: int, layer: int,
                   leader: tuple[Tensor, Tensor | None] | None = None,
                   scores: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(positions, scores) of one layer: positions [B, N] or [B, Hkv, N] sorted, one choice per
    sequence (and per KV head for per-head methods).

    q [B, Hq, T, D] (most methods read only the last `window` queries), k [B, Hkv, T, D],
    tokens [B, T]. A layer that is not a reuse leader skips scoring: it takes the leader's
    positions, or re-selects from the leader's scores when its own budget differs (pyramidkv).
    Precomputed `scores` of this layer also skip scoring (one scoring, many budgets).
    """
    n_batch, n_kv_heads, n_prompt = k.shape[:3]
    # a pyramidkv leader that keeps everything still scores: its followers keep less and select from its scores
    scores_for_followers = (config.method == "pyramidkv" and config.reuse > 1 and is_reuse_leader(layer, config.reuse)
                            and config.prompt_budget(n_prompt) < n_prompt)
    if config.method == "full" or (budget >= n_prompt and config.method != "fastgen" and not scores_for_followers):
        shape = (n_batch, n_kv_heads, n_prompt) if config.per_kv_head else (n_batch, n_prompt)
        return torch.arange(n_prompt, device=k.device).expand(shape), None  # nothing to drop
    if leader is not None and not is_reuse_leader(layer, config.reuse) and config.method in SCORED:
        leader_positions, leader_scores = leader
        if leader_positions.shape[-1] == budget or config.method == "fastgen":
            return leader_positions, leader_scores
        if leader_scores is not None:
            return select(config, leader_scores, tokens, budget), leader_scores
    if scores is None:
        scores = score(config, q, k)
    return select(config, scores, tokens, budget), scores


def recompress_slots(config: CompressionConfig, q_win: Tensor, k: Tensor, budget: int) -> Tensor:
    """Which of a full cache's slots to keep when it is compressed again (decode-time ChunkKV).

    q_win [B, Hq, W, D]: the last W queries the layer has seen (the tokens in the last W
    slots); k [B, Hkv, n, D]: the n used slots, oldest first. The cache is scored like a prompt
    whose tokens are its slots: the last W slots are the observation window, always kept,
    and window query i sees slots up to n - W + i. ChunkKV cuts the older slots into chunks of
    consecutive slots and keeps whole chunks to exactly `budget` (select_chunks); SnapKV keeps
    the best single slots; StreamingLLM the first n_sinks and the most recent slots.
    Returns kept slot indices, sorted: [B, N] (one choice per row) or [B, Hkv, N] (per KV head),
    N = min(budget, n). Raises CompressionError for the other methods.
    """
    if config.method not in RECOMPRESSIBLE:
        raise CompressionError(f"method {config.method!r} cannot re-compress a full cache: "
                               f"use one of {', '.join(RECOMPRESSIBLE)}")
    n_batch, n_used = k.shape[0], k.shape[2]
    if config.method == "streaming":
        return streaming_positions(n_batch, n_used, budget, config.n_sinks, k.device)
    if n_used <= budget:
        return torch.arange(n_used, device=k.device).expand(n_batch, n_used)
    scores = score(config, q_win, k)  # [B, n] or [B, Hkv, n]: slot-ordered, like a prompt's token scores
    if config.method == "chunkkv":
        return select_chunks(scores, budget, config.window, config.chunk_size)
    return select_tokens(scores, budget, config.window)


def gather_kv(k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """k, v [B, Hkv, T, D] and positions [B, N] (all heads) or [B, Hkv, N] -> kept k, v [B, Hkv, N, D].
    Unused slots (-1) get position 0's entry; the cache masks them."""
    if positions.dim() == 2:
        positions = positions[:, None].expand(-1, k.shape[1], -1)
    index = positions.clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[3])
    return k.gather(2, index), v.gather(2, index)
