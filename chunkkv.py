"""ChunkKV: chunk-based KV-cache compression, as small pure functions on tensors.

ChunkKV (Liu et al., NeurIPS 2025) compresses each layer's KV cache once, right after
prefill. The last `window` prompt queries score every prompt token; the prefix before
the window is cut into chunks of `chunk_size` consecutive tokens; the best-scoring
whole chunks are kept (plus the window) until the per-layer budget is full. Keeping
whole chunks instead of scattered tokens keeps phrases, names and numbers intact.
The baselines (StreamingLLM, H2O, SnapKV, PyramidKV, FastGen, KVzip) are rows of one table,
`METHODS`: a scorer, a selector and a few flags each; the scorer may also be KVzip's (a repeat
of the context attends to it), for compressing a context before any question.

This file depends on torch and einops only: copy it into your own project.

Shapes: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv query heads per KV head,
T prompt tokens, W observation window, D head dim, N kept entries.
"""
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


class CompressionError(ValueError):
    """A compression setting that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class CompressionConfig:
    """What each layer keeps of a prompt. chunkkv's own runs refuse a budget with no room beside the
    window (or the sinks). A host such as kvpress asks any ratio of any length: with host=True nothing
    is refused and the host rule applies instead: a budget of `window` or less keeps the last `budget`
    tokens (streaming: of `n_sinks` or less, the first), a prompt within the window is compressed
    like any other, and full and fastgen ignore keep/budget (they choose their own counts)."""
    method: str = "chunkkv"  # a key of METHODS
    keep: float | None = None  # fraction of the prompt's KV entries kept per layer (default 0.1: keeps 10 %)
    budget: int | None = None  # or an absolute count of prompt entries per layer, window included
    window: int = 32  # observation window: the last prompt tokens, always kept, whose queries score
    chunk_size: int = 10  # chunkkv: tokens per chunk (the paper's choice)
    reuse: int = 1  # layer-wise index reuse depth: layers l..l+reuse-1 share layer l's selection
    per_head: bool = False  # chunkkv: choose chunks per KV head instead of once per layer
    n_sinks: int = 4  # streaming: attention-sink tokens kept at the start
    pool_kernel: int = 7  # snapkv / pyramidkv: max-pool width along keys
    pyramid_beta: float = 20.0  # pyramidkv: the last layer keeps (budget - window) / beta prefix tokens
    recovery: float = 0.9  # fastgen: attention mass each head's policy must recover
    special_ids: tuple[int, ...] = ()  # fastgen: special-token ids of the tokenizer
    punctuation_ids: tuple[int, ...] = ()  # fastgen: punctuation-token ids of the tokenizer
    host: bool = False  # the host rule (above) instead of refusals: for hosts that ask any budget (kvpress)
    scorer: str | None = None  # "window" (the paper's) or "reconstruct" (KVzip's repeat); None: the method's own
    global_budget: bool = False  # kvzip, chunkkv on reconstruction scores: all layers' budgets in one ranking

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressionError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        row = METHODS[self.method]
        if not row.budgeted and (self.keep is not None or self.budget is not None) and not self.host:
            raise CompressionError(f"{self.method} " + ("keeps every entry: drop keep/budget" if row.score is None else
                                                        "chooses each head's budget itself: drop keep/budget, tune recovery"))
        if self.keep is not None and self.budget is not None:
            raise CompressionError("pass keep (a fraction) or budget (a count), not both")
        if self.scorer not in (None, *SCORERS):
            raise CompressionError(f"unknown scorer {self.scorer!r}: choose one of {', '.join(SCORERS)}")
        if self.scorer not in (None, row.scorer) and (row.score is None or not row.rescorable):
            raise CompressionError(f"{self.method} runs only on its own scorer ({row.scorer if row.score else 'none'}): "
                                   f"drop scorer, or use one of {', '.join(RESCORABLE)}")
        if self.global_budget and (self.method not in ("kvzip", "chunkkv") or self.scoring != "reconstruct"
                                   or self.reuse > 1 or self.per_head or self.host):
            raise CompressionError("global_budget ranks every layer's entries together, for kvzip and chunkkv on the "
                                   "reconstruct scorer, without reuse, per_head or host: drop it, or change those")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise CompressionError(f"keep must be in (0, 1], got {self.keep}: 0.1 keeps 10 % of the prompt")
        if self.per_head and row.per_head is not None:
            raise CompressionError(f"per_head chooses chunks per KV head, for chunkkv only: {self.method} is "
                                   f"{'always' if row.per_head else 'never'} per KV head; drop per_head")
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
        if self.budget is not None and self.budget < self.min_budget and not self.host:
            raise CompressionError(f"budget {self.budget} leaves no room beside {self.protected}: "
                                   f"use a budget of at least {self.min_budget}")

    @property
    def row(self) -> "Method":
        return METHODS[self.method]

    @property
    def scoring(self) -> str:
        """The scorer this config runs: `scorer`, else the method's own."""
        return self.scorer or self.row.scorer

    @property
    def per_kv_head(self) -> bool:
        """Whether each KV head keeps its own positions ([B, Hkv, N] instead of [B, N])."""
        return self.per_head if self.row.per_head is None else self.row.per_head

    @property
    def protected(self) -> str:
        """What every budget keeps first, in words (for errors)."""
        return f"the observation window ({self.window})" if self.row.windowed else f"the {self.n_sinks} attention sinks"

    @property
    def min_budget(self) -> int:
        """The smallest budget that keeps one entry beside the window (or the sinks)."""
        return (self.window if self.row.windowed else self.n_sinks) + 1

    def prompt_budget(self, n_prompt: int) -> int:
        """KV entries kept per layer for a prompt of `n_prompt` tokens, window included
        (for pyramidkv the mean over layers; full and fastgen: the prompt, fastgen's upper bound)."""
        if not self.row.budgeted or (self.row.windowed and n_prompt <= self.window and not self.host):
            return n_prompt  # nothing to drop, or the whole prompt is the window
        keep = 0.1 if self.keep is None else self.keep
        budget = self.budget if self.budget is not None else round(keep * n_prompt)
        if self.host:
            return max(0, min(budget, n_prompt))
        if budget < self.min_budget:
            raise CompressionError(
                f"keep {keep} of a {n_prompt}-token prompt is {budget} KV entries, fewer than {self.protected} "
                f"+ 1: raise keep, pass a budget of at least {self.min_budget}, or use method 'full'")
        return min(budget, n_prompt)

    def layer_budgets(self, n_prompt: int, n_layers: int) -> list[int]:
        """Prompt KV entries kept by each layer (pyramidkv: flat when the budget leaves no prefix)."""
        budget = self.prompt_budget(n_prompt)
        if not self.row.pyramid or budget >= n_prompt or budget <= self.window:
            return [budget] * n_layers
        return pyramid_budgets(budget, self.window, n_layers, self.pyramid_beta, n_prompt)


def pyramid_budgets(budget: int, window: int, n_layers: int, beta: float, n_prompt: int) -> list[int]:
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
    if high > n_prompt - window:
        high = Fraction(n_prompt - window)
        low = 2 * prefix - high
    exact = [high - (high - low) * layer / (n_layers - 1) for layer in range(n_layers)]
    floors = [math.floor(x) for x in exact]
    extra = n_layers * prefix - sum(floors)  # the rounding remainder: +1 for the top layers not already whole
    rounded_up = [layer for layer, (f, x) in enumerate(zip(floors, exact)) if f < x][:extra]
    return [window + f + (1 if layer in rounded_up else 0) for layer, f in enumerate(floors)]


# ---------------------------------------------------------------------------------------
# Scoring: how much the observation window attends to each prompt token.

def grouped_logits(q: Tensor, k: Tensor, visible: Tensor) -> Tensor:
    """Attention logits, in float32, of queries q [B, Hq, n, D] over keys k [B, Hkv, S, D], -inf where
    visible [n, S'] is False for the last S' keys (every query sees the keys before them) -> [B, Hkv, G,
    n, S]. Query heads are grouped by the KV head they share, so K is never expanded."""
    q = rearrange(q.float() / math.sqrt(k.shape[3]), "b (h g) t d -> b h (g t) d", h=k.shape[1])
    logits = q @ k.float().transpose(-1, -2)  # [B, Hkv, G*n, S]
    logits = rearrange(logits, "b h (g t) s -> b h g t s", t=visible.shape[0])
    logits[..., k.shape[2] - visible.shape[1]:].masked_fill_(~visible, float("-inf"))
    return logits


def window_attention(q_win: Tensor, k: Tensor) -> Tensor:
    """Softmax attention, in float32, of the last W prompt queries q_win [B, Hq, W, D] (any W <= T) over
    all T keys k [B, Hkv, T, D] -> [B, Hkv, G, W, T]. Window query i sits at position T - W + i and sees
    keys up to its own position (causal inside the window)."""
    n_prompt, n_window = k.shape[2], q_win.shape[2]
    query_pos = torch.arange(n_prompt - n_window, n_prompt, device=k.device)
    return grouped_logits(q_win, k, torch.arange(n_prompt, device=k.device) <= query_pos[:, None]).softmax(dim=-1)


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
    if prefix.shape[-1] == 0:  # the queries cover the whole prompt: nothing to pool (max_pool1d refuses it)
        return scores
    pooled = F.max_pool1d(prefix, kernel_size=kernel, stride=1, padding=kernel // 2)
    return torch.cat([pooled[..., :prefix.shape[-1]], scores[..., prefix.shape[-1]:]], dim=-1)


def h2o_scores(q: Tensor, k: Tensor, block: int = 512) -> Tensor:
    """H2O (prefill form): attention the prompt queries pay each key, summed over queries and
    averaged over each group's query heads, [B, Hkv, T]. q [B, Hq, n, D] holds the last n <= T
    queries (all T: H2O proper; fewer: a host that projected only those). Queries run in blocks of
    `block`, so no T x T matrix is ever held."""
    n_kv_heads, n_prompt = k.shape[1], k.shape[2]
    first = n_prompt - q.shape[2]  # position of the first query
    scores = k.new_zeros(k.shape[0], n_kv_heads, n_prompt, dtype=torch.float32)
    keys = torch.arange(n_prompt, device=k.device)
    for start in range(0, q.shape[2], block):
        end = min(start + block, q.shape[2])
        seen = first + end  # queries [start, end) sit at first + start.. and see keys [0, seen)
        visible = keys[:seen] <= torch.arange(first + start, seen, device=k.device)[:, None]  # [t, seen]
        probs = grouped_logits(q[:, :, start:end], k[:, :, :seen], visible).softmax(dim=-1)  # [B, Hkv, G, t, seen]
        scores[..., :seen] += probs.sum(dim=3).mean(dim=2)
    return scores


def reconstruction_scores(q_repeat: Tensor, k: Tensor, start: int, end: int, n_context: int, n_sinks: int,
                          block: int = 16, own_lse: Tensor | None = None) -> Tensor:
    """KVzip's scores of the context tokens [start, end) (Kim et al., NeurIPS 2025; snu-mllab/KVzip attention/score.py,
    kvpress KVzipPress): softmax attention, in float32, of the R queries of a teacher-forced repeat of that block,
    q_repeat [B, Hq, R, D] (post-RoPE, after the context), over the first min(n_sinks, start) keys, the block's keys
    and the repeat's own (causally) only; the max over each KV head's query heads and over the queries. k [B, Hkv,
    n_context + R, D]: the context's keys, then the repeat's. own_lse [B, Hq, R]: each query's log-sum-exp of its
    scaled logits over the repeat's keys up to itself (devices.cache_then_causal's; None: computed here).
    -> [B, Hkv, end - start]. Queries run in blocks of `block` (small: their logits stay in cache)."""
    n_repeat, sink = q_repeat.shape[2], min(n_sinks, start)
    # the repeat's own keys, or one stand-in whose logit is set to their log-sum-exp: the same softmax sums
    own = k[:, :, n_context:n_context + n_repeat] if own_lse is None else k.new_zeros(*k.shape[:2], 1, k.shape[3])
    keys = torch.cat([k[:, :, :sink], k[:, :, start:end], own], dim=2).float()
    n_seen, ids = sink + end - start, torch.arange(n_repeat, device=k.device)  # every query sees the n_seen keys
    scores = k.new_zeros((k.shape[0], k.shape[1], end - start), dtype=torch.float32)
    for first in range(0, n_repeat, block):
        last = min(first + block, n_repeat)  # the block's queries see the repeat's keys [0, first) and their own
        visible = (ids[first:last] <= ids[first:last, None] if own_lse is None  # [r, r]: causal among the block's own
                   else ids.new_ones((last - first, 1), dtype=torch.bool))  # [r, 1]: the stand-in, seen by all
        logits = grouped_logits(q_repeat[:, :, first:last], keys[:, :, :n_seen + last], visible)  # [B, Hkv, G, r, S]
        if own_lse is not None:
            logits[..., -1] = own_lse[:, :, first:last].reshape(logits.shape[:-1])  # [B, Hq, r] -> [B, Hkv, G, r]
        scores = torch.maximum(scores, logits.softmax(dim=-1)[..., sink:n_seen].amax(dim=(2, 3)))
    return scores


# ---------------------------------------------------------------------------------------
# Selection: whole chunks in score order until the budget is full, plus the window.

def chunk_scores(token_scores: Tensor, chunk_size: int) -> Tensor:
    """[..., P] -> [..., ceil(P / c)]: summed scores of consecutive chunks (last may be short)."""
    n_chunks = -(-(n_tokens := token_scores.shape[-1]) // chunk_size)
    padded = F.pad(token_scores, (0, n_chunks * chunk_size - n_tokens))
    return rearrange(padded, "... (n c) -> ... n c", c=chunk_size).sum(-1)


def top_positions(priority: Tensor, budget: int) -> Tensor:
    """The `budget` highest-priority positions of priority [..., T], sorted: [..., min(budget, T)]."""
    return priority.topk(min(budget, priority.shape[-1]), dim=-1).indices.sort(dim=-1).values


def with_window(prefix_order: Tensor, n_prompt: int) -> Tensor:
    """Priorities [..., T] from the keep order of the prefix tokens [..., P] (unique, 0 kept first):
    the window [P, T) above every prefix token, the latest highest. float32: exact below 2^24 tokens."""
    *lead, n_prefix = prefix_order.shape
    window = torch.arange(n_prompt - n_prefix, device=prefix_order.device).expand(*lead, -1)
    return torch.cat([-1 - prefix_order, window], dim=-1).float()


def chunk_priority(token_scores: Tensor, window: int, chunk_size: int) -> Tensor:
    """ChunkKV as a per-token keep priority [..., T] from token scores [..., T], unique per row:
    for every budget, the top-`budget` positions are exactly what select_chunks keeps, so a host
    that keeps the top-k of any score (kvpress's ScorerPress) runs ChunkKV. The window (cut to the
    prompt) ranks first, latest first; then the prefix [0, T - window) in ChunkKV's fill order:
    chunks by descending score (ties: earlier chunk first), each from its first token on."""
    n_prompt = token_scores.shape[-1]
    n_prefix = n_prompt - min(window, n_prompt)
    scores = chunk_scores(token_scores[..., :n_prefix], chunk_size)
    chunk_order = scores.sort(dim=-1, descending=True, stable=True).indices  # stable: ties by position
    chunk_rank = chunk_order.argsort(dim=-1)
    # every prefix token gets its place in the fill order: its chunk's rank, then its offset, so the
    # first budget - window places are whole chunks and then the first tokens of the next one
    pos = torch.arange(n_prefix, device=token_scores.device)
    token_chunk_rank = chunk_rank.gather(-1, (pos // chunk_size).expand(*scores.shape[:-1], n_prefix))
    return with_window(token_chunk_rank * chunk_size + pos % chunk_size, n_prompt)


def entropy_gated_priority(token_scores: Tensor, window: int, chunk_size: int, n_spiky: int = 4) -> Tensor:
    """EG-ChunkKV (kvpress EntropyGatedChunkKVPress, NVIDIA/kvpress #263) as a keep priority [..., T] from
    scores [..., T] >= 0: the window first; then the prefix chunks by descending mean score, each offering
    its tokens by descending score, but only its top `n_spiky` if it is important and spiky (mean score
    at or above the median chunk's, normalised score entropy below the median); then the prefix tokens
    not offered, by descending score. Ties: earlier first; a chunk with an infinite score is not spiky."""
    n_prompt = token_scores.shape[-1]
    n_prefix = n_prompt - min(window, n_prompt)
    n_chunks = -(-n_prefix // chunk_size)
    chunks = rearrange(F.pad(token_scores[..., :n_prefix], (0, n_chunks * chunk_size - n_prefix)),
                       "... (n c) -> ... n c", c=chunk_size)  # [..., n, c], the last padded with 0
    lengths = (n_prefix - chunk_size * torch.arange(n_chunks, device=chunks.device)).clamp(max=chunk_size)
    p = chunks / (chunks.sum(-1, keepdim=True) + 1e-8)  # kvpress's epsilons: the same gates
    entropy = torch.where(lengths > 1, -(p * (p + 1e-8).log()).sum(-1) / lengths.clamp(min=2).log(), 0)
    entropy = entropy.nan_to_num(1.0).clamp(0, 1)  # nan: a chunk with an infinite score (the sinks)
    means = chunks.sum(-1) / lengths
    spiky = (means >= means.median(-1, keepdim=True).values) & (entropy < entropy.median(-1, keepdim=True).values)
    in_chunk = chunks.sort(dim=-1, descending=True, stable=True).indices.argsort(dim=-1)  # each token's rank
    offered = in_chunk < torch.where(spiky, min(n_spiky, chunk_size), lengths)[..., None]
    chunk_rank = means.sort(dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
    first = rearrange(chunk_rank[..., None] * chunk_size + in_chunk, "... n c -> ... (n c)")[..., :n_prefix]
    offered = rearrange(offered, "... n c -> ... (n c)")[..., :n_prefix]
    rest = token_scores[..., :n_prefix].masked_fill(offered, -math.inf).sort(dim=-1, descending=True, stable=True)
    return with_window(torch.where(offered, first, n_chunks * chunk_size + rest.indices.argsort(dim=-1)), n_prompt)


def token_priority(token_scores: Tensor, window: int) -> Tensor:
    """Token-level methods' keep priority [..., T]: the window first (latest first), then the prefix
    tokens by descending score (ties: earlier first). Its top-k is select_tokens for every budget."""
    n_prefix = (n_prompt := token_scores.shape[-1]) - min(window, n_prompt)
    order = token_scores[..., :n_prefix].sort(dim=-1, descending=True, stable=True).indices
    return with_window(order.argsort(dim=-1), n_prompt)


def streaming_priority(n_prompt: int, n_sinks: int, device=None) -> Tensor:
    """StreamingLLM's keep priority [T]: the sinks first (earliest first), then the latest tokens."""
    pos = torch.arange(n_prompt, device=device)
    return torch.where(pos < n_sinks, n_prompt + n_sinks - pos, pos).float()  # sinks above every other token


def select_chunks(token_scores: Tensor, budget: int, window: int, chunk_size: int) -> Tensor:
    """Kept prompt positions [..., budget], sorted, from token scores [..., T]: chunks of the prefix
    [0, T - window) in descending score order (ties: earlier first) while they fit into budget - window,
    then the first tokens of the next one, and the window [T - window, T). T <= budget: every position;
    budget <= window (the host rule: CompressionConfig.host): the last `budget` tokens."""
    return top_positions(chunk_priority(token_scores, window, chunk_size), budget)


def select_tokens(token_scores: Tensor, budget: int, window: int) -> Tensor:
    """Token-level selection (H2O, SnapKV, PyramidKV): the budget - window best prefix tokens
    (ties: earlier first) plus the window, [..., budget] sorted, from scores [..., T]."""
    return top_positions(token_priority(token_scores, window), budget)


def fastgen_mask(scores: Tensor, tokens: Tensor | None, config: CompressionConfig) -> Tensor:
    """FastGen (prefill form): each KV head takes the cheapest policy of special tokens ->
    + punctuation -> + frequent (heavy hitters) -> + local -> full whose kept set recovers at
    least `config.recovery` of its window attention mass; the window is always kept.

    scores [B, Hkv, T] (window attention), tokens [B, T] (None when config names no special or
    punctuation ids) -> keep [B, Hkv, T] bool, True = kept: heads keep different counts, so a host
    without per-head cache lengths masks the rest (kvpress: masked_key_indices).
    """
    n_prompt, device = scores.shape[-1], scores.device
    pos = torch.arange(n_prompt, device=device)
    window = (pos >= n_prompt - config.window).expand_as(scores)
    special = window | token_among(tokens, config.special_ids, n_prompt, device)
    punctuation = special | token_among(tokens, config.punctuation_ids, n_prompt, device)
    top = scores.topk(max(1, round(0.3 * n_prompt)), dim=-1).indices  # the 30 % heaviest hitters
    frequent = punctuation | torch.zeros_like(punctuation).scatter_(-1, top, True)
    local = frequent | (pos >= n_prompt - round(0.3 * n_prompt))  # and the last 30 %
    masks = torch.stack([special, punctuation, frequent, local, torch.ones_like(local)])  # [5, B, Hkv, T]
    recovered = (masks * scores).sum(-1) / scores.sum(-1)  # [5, B, Hkv]
    enough = (recovered >= config.recovery) & (config.recovery < 1)  # 1.0 means: keep everything
    enough[-1] = True
    policy = enough.int().argmax(dim=0)  # the first (cheapest) policy that is enough
    return masks.gather(0, policy[None, ..., None].expand(1, *scores.shape))[0]  # [B, Hkv, T]


def token_among(tokens: Tensor | None, ids: tuple[int, ...], n_prompt: int, device) -> Tensor:
    """Whether each prompt token is one of `ids`, [B, 1, T] ([1, 1, T] of False when there are no ids)."""
    if not ids:
        return torch.zeros(1, 1, n_prompt, dtype=torch.bool, device=device)
    if tokens is None:
        raise CompressionError("fastgen reads the prompt's token ids (special tokens, punctuation): pass tokens")
    return torch.isin(tokens, torch.tensor(ids, device=tokens.device, dtype=tokens.dtype))[:, None]


def mask_positions(keep: Tensor) -> Tensor:
    """keep [..., T] bool -> each row's kept positions [..., N], sorted, padded with -1 to the largest count N."""
    n_kept = int(keep.sum(-1).max())  # prefill is eager: a data-dependent size is fine here
    # kept positions first, in order; the rest sort past them and become -1 padding
    pos = torch.arange(n_prompt := keep.shape[-1], device=keep.device)
    order = torch.where(keep, pos, n_prompt + pos).sort(dim=-1).values[..., :n_kept]
    return torch.where(order < n_prompt, order, -1)


def global_scores(config: CompressionConfig, scores: list[Tensor], budgets: list[int]) -> list[Tensor]:
    """All layers' budgets (entries per KV head) spent by one ranking of all layers' scores [B, Hkv, T]
    per row (ties: earlier layer, head, position first). kvzip: the best entries of every layer and KV head
    (KVzip's own budget: Kim et al., NeurIPS 2025; kvpress KVzipPress(layerwise=False)). chunkkv: each
    layer's window, then all layers' prefix chunks by score (summed over KV heads; [B, T] taken as summed),
    whole while they fit, then the next one's first tokens. -> the scores, -inf where dropped."""
    pooled = torch.stack(scores, dim=1)  # [B, L, Hkv, T]
    if config.method == "kvzip":
        keep = top_of_all(pooled, sum(budget * pooled.shape[2] for budget in budgets))
        return [layer.masked_fill(~keep[:, i], -math.inf) for i, layer in enumerate(scores)]
    tokens = pooled.sum(dim=2) if pooled.dim() == 4 else pooled  # [B, L, T]: summed over KV heads unless given so
    n_prefix = tokens.shape[-1] - (n_window := min(config.window, tokens.shape[-1]))
    # each prefix token carries its chunk's score, so a stable sort takes whole chunks in score order
    chunk = chunk_scores(tokens[..., :n_prefix], config.chunk_size).repeat_interleave(config.chunk_size, -1)
    keep = top_of_all(chunk[..., :n_prefix], sum(min(budget - n_window, n_prefix) for budget in budgets))
    keep = F.pad(keep, (0, n_window), value=True)  # and every layer's window
    return [tokens[:, i].masked_fill(~keep[:, i], -math.inf) for i in range(len(scores))]


def top_of_all(values: Tensor, n: int) -> Tensor:
    """Whether each entry of values [B, ...] is among its row's n largest, bool [B, ...] (ties: earlier first)."""
    best = values.flatten(1).sort(dim=-1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(values, dtype=torch.bool).flatten(1).scatter_(1, best, True).view(values.shape)


# ---------------------------------------------------------------------------------------
# The method table: one row per method, a scorer and a selector each.
# A scorer is (config, q [B, Hq, n, D], k [B, Hkv, T, D]) -> scores [B, T] or [B, Hkv, T], for the last
# n <= T queries (any n: it reads the last `window`, or all n for all_queries);
# a selector is (config, scores, budget, k, tokens=None) -> sorted positions [B, N] or [B, Hkv, N].

@dataclass(frozen=True)
class Method:
    """One row of METHODS: how a method scores prompt tokens and which it keeps."""
    score: Callable | None  # None: the selection needs no scores (full, streaming)
    select: Callable
    per_head: bool | None  # positions per KV head ([B, Hkv, N]); None: CompressionConfig.per_head decides
    windowed: bool = True  # always keeps the last `window` tokens, so a budget needs room beside them
    budgeted: bool = True  # keeps `keep`/`budget` entries; False: chooses its own count (full, fastgen)
    pyramid: bool = False  # per-layer budgets fall linearly with depth (PyramidKV)
    recompressible: bool = False  # can compress a full cache again at decode time (recompress_slots)
    all_queries: bool = False  # the scorer reads every prompt query (h2o); the others only the last `window`
    scorer: str = "window"  # its scorer unless CompressionConfig.scorer says otherwise (SCORERS)
    rescorable: bool = True  # its selector runs on either scorer (fastgen's policy reads attention mass)


def window_score(config: CompressionConfig, q: Tensor, k: Tensor) -> Tensor:
    return (head_window_scores if config.per_head else window_scores)(q[:, :, -config.window:], k)


def pooled_window_score(config: CompressionConfig, q: Tensor, k: Tensor) -> Tensor:
    return snapkv_scores(q[:, :, -config.window:], k, config.pool_kernel)


def top_tokens(config: CompressionConfig, scores: Tensor, budget: int, k: Tensor, tokens=None) -> Tensor:
    return select_tokens(scores, budget, config.window)


def top_chunks(config: CompressionConfig, scores: Tensor, budget: int, k: Tensor, tokens=None) -> Tensor:
    return select_chunks(scores, budget, config.window, config.chunk_size)


def needs_reconstruction(config: CompressionConfig, q: Tensor, k: Tensor) -> Tensor:
    raise CompressionError("scorer 'reconstruct' scores a context by teacher-forcing a repeat of it, not from the "
                           "prompt's queries: compress with generate.compress_context and a contexts.Repeat")


def sinks_and_recent(config: CompressionConfig, scores, budget: int, k: Tensor, tokens=None) -> Tensor:
    """StreamingLLM: the first n_sinks tokens (attention sinks) and the last budget - n_sinks, [B, budget]."""
    return top_positions(streaming_priority(k.shape[2], config.n_sinks, k.device), budget).expand(k.shape[0], -1)


def everything(config: CompressionConfig, scores, budget: int, k: Tensor, tokens=None) -> Tensor:
    return all_positions(k, per_head=False)


def cheapest_policy(config: CompressionConfig, scores: Tensor, budget: int, k: Tensor, tokens=None) -> Tensor:
    return mask_positions(fastgen_mask(scores, tokens, config))


METHODS = {  # scorers (config, q, k) and selectors (config, scores, budget, k, tokens=None), as above
    "full": Method(None, everything, per_head=False, windowed=False, budgeted=False),
    "streaming": Method(None, sinks_and_recent, per_head=False, windowed=False, recompressible=True),
    "h2o": Method(lambda c, q, k: h2o_scores(q, k), top_tokens, per_head=True, all_queries=True),
    "snapkv": Method(pooled_window_score, top_tokens, per_head=True, recompressible=True),
    "pyramidkv": Method(pooled_window_score, top_tokens, per_head=True, pyramid=True),
    "chunkkv": Method(window_score, top_chunks, per_head=None, recompressible=True),
    "eg-chunkkv": Method(window_score, lambda c, s, budget, k, t=None:
                         top_positions(entropy_gated_priority(s, c.window, c.chunk_size), budget), per_head=False),
    "fastgen": Method(lambda c, q, k: head_window_scores(q[:, :, -c.window:], k), cheapest_policy, per_head=True,
                      budgeted=False, rescorable=False),
    # kvzip: no window, and its sinks score highest (reconstruction scores give them +inf)
    "kvzip": Method(needs_reconstruction, lambda c, s, budget, k, t=None: select_tokens(s, budget, window=0),
                    per_head=True, windowed=False, scorer="reconstruct", rescorable=False),
}
SCORERS = ("window", "reconstruct")
RESCORABLE = tuple(name for name, row in METHODS.items() if row.score is not None and row.rescorable)
SCORED = tuple(name for name, row in METHODS.items() if row.score is not None)  # layer-wise reuse applies to these
RECOMPRESSIBLE = tuple(sorted(name for name, row in METHODS.items() if row.recompressible))


# ---------------------------------------------------------------------------------------
# One layer: which positions to keep, then gather them.

def all_positions(k: Tensor, per_head: bool) -> Tensor:
    """Every position of k [B, Hkv, T, D]: [B, Hkv, T] or [B, T]."""
    shape = k.shape[:3] if per_head else (k.shape[0], k.shape[2])
    return torch.arange(k.shape[2], device=k.device).expand(shape)


def keep_positions(config: CompressionConfig, q: Tensor, k: Tensor, budget: int, layer: int,
                   leader: tuple[Tensor, Tensor | None] | None = None, scores: Tensor | None = None,
                   tokens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(positions, scores) of one layer: positions [B, N] or [B, Hkv, N] sorted (-1: a head's
    padding, fastgen), one choice per sequence (and per KV head for per-head methods).

    q [B, Hq, n, D], the last n <= T queries (most methods read only the last `window`; h2o all n;
    None when nothing scores), k [B, Hkv, T, D]; tokens [B, T] for fastgen with special or
    punctuation ids. Layer-wise reuse: a layer with layer % reuse != 0 skips scoring and takes
    `leader`, the (positions, scores) the last scoring layer returned, or re-selects from the
    leader's scores when its own budget differs (pyramidkv). Precomputed `scores` of this layer
    also skip scoring (one scoring, many budgets); a per-layer selector sums per-KV-head ones over heads.
    """
    row = config.row
    if leader is not None and layer % config.reuse != 0 and row.score is not None:
        leader_positions, leader_scores = leader
        if leader_positions.shape[-1] == budget or not row.budgeted or leader_scores is None:
            return leader_positions, leader_scores
        return row.select(config, leader_scores, budget, k, tokens), leader_scores
    # a pyramidkv leader that keeps everything still scores: its followers keep less and select from its scores
    scores_for_followers = row.pyramid and config.reuse > 1 and config.prompt_budget(k.shape[2]) < k.shape[2]
    if row.score is None or (row.budgeted and budget >= k.shape[2] and not scores_for_followers):
        return (row.select(config, None, budget, k, tokens) if row.score is None
                else all_positions(k, config.per_kv_head)), None  # nothing to drop
    if scores is None:
        scores = (row.score if config.scoring == "window" else needs_reconstruction)(config, q, k)
    elif scores.dim() == 3 and not config.per_kv_head:
        scores = scores.sum(dim=1)
    if config.global_budget:  # the scores hold the choice already (global_scores): -inf is dropped
        return mask_positions(scores > -math.inf), scores
    return row.select(config, scores, budget, k, tokens), scores


def recompress_slots(config: CompressionConfig, q_win: Tensor, k: Tensor, budget: int) -> Tensor:
    """Which of a full cache's n used slots k [B, Hkv, n, D] to keep when it is compressed again
    (decode-time ChunkKV), scored like a prompt whose tokens are the slots: q_win [B, Hq, W, D],
    the last W queries the layer saw, score; the last W slots are the window. ChunkKV keeps whole
    chunks of consecutive slots, SnapKV single slots, StreamingLLM the sinks and the most recent.
    Sorted slot indices [B, N] or [B, Hkv, N], N = min(budget, n); CompressionError for the rest."""
    if not config.row.recompressible:
        raise CompressionError(f"method {config.method!r} cannot re-compress a full cache: "
                               f"use one of {', '.join(RECOMPRESSIBLE)}")
    return keep_positions(config, q_win, k, budget, layer=0)[0]


def gather_kv(k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """k, v [B, Hkv, T, D] and positions [B, N] (all heads) or [B, Hkv, N] -> kept k, v [B, Hkv, N, D].
    Unused slots (-1) get position 0's entry; the cache masks them."""
    if positions.dim() == 2:
        positions = positions[:, None].expand(-1, k.shape[1], -1)
    index = positions.clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[3])
    return k.gather(2, index), v.gather(2, index)
