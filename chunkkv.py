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

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

METHODS = ("full", "chunkkv")


class CompressionError(ValueError):
    """A compression setting that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class CompressionConfig:
    method: str = "chunkkv"
    keep: float = 0.1  # fraction of the prompt's KV entries kept per layer (0.1 keeps 10 %)
    budget: int | None = None  # or an absolute count of prompt entries per layer; wins over keep
    window: int = 32  # observation window: the last prompt tokens, always kept, whose queries score
    chunk_size: int = 10
    reuse: int = 1  # layer-wise index reuse depth: layers l..l+reuse-1 share layer l's indices

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressionError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0 < self.keep <= 1:
            raise CompressionError(f"keep must be in (0, 1], got {self.keep}: 0.1 keeps 10 % of the prompt")
        for name in ("window", "chunk_size", "reuse"):
            if getattr(self, name) < 1:
                raise CompressionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.budget is not None and self.budget < self.window + 1:
            raise CompressionError(
                f"budget {self.budget} leaves no room beside the observation window ({self.window}): "
                f"use a budget of at least {self.window + 1} or a smaller window")

    def prompt_budget(self, n_prompt: int) -> int:
        """KV entries kept per layer for a prompt of `n_prompt` tokens, window included."""
        if self.method == "full" or n_prompt <= self.window:
            return n_prompt  # nothing to drop, or the whole prompt is the window
        budget = self.budget if self.budget is not None else round(self.keep * n_prompt)
        if budget < self.window + 1:
            raise CompressionError(
                f"keep {self.keep} of a {n_prompt}-token prompt is {budget} KV entries, fewer than the "
                f"observation window ({self.window}) + 1: raise keep, pass a budget of at least "
                f"{self.window + 1}, or use method 'full'")
        return min(budget, n_prompt)


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
    """One score per prompt token, summed over window queries and all heads: [B, T]."""
    return window_attention(q_win, k).sum(dim=(1, 2, 3))


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


# ---------------------------------------------------------------------------------------
# One layer: which positions to keep, then gather them.

def is_reuse_leader(layer: int, reuse: int) -> bool:
    """Layer-wise reuse: layer l scores when l % reuse == 0, the others borrow its indices."""
    return layer % reuse == 0


def keep_positions(config: CompressionConfig, q: Tensor, k: Tensor, budget: int, layer: int,
                   leader_positions: Tensor | None = None) -> Tensor:
    """Prompt positions one layer keeps, [B, budget], sorted; one choice per sequence.

    q [B, Hq, T, D] (only the last `window` queries are used), k [B, Hkv, T, D].
    A layer that is not a reuse leader returns `leader_positions` and does no scoring.
    """
    n_batch, n_prompt = k.shape[0], k.shape[2]
    if config.method == "full" or budget >= n_prompt:
        return torch.arange(n_prompt, device=k.device).expand(n_batch, n_prompt)
    if not is_reuse_leader(layer, config.reuse):
        if leader_positions is None:
            raise ValueError(f"layer {layer} reuses its leader's positions, but none were given")
        return leader_positions
    scores = window_scores(q[:, :, -config.window:], k)
    return select_chunks(scores, budget, config.window, config.chunk_size)


def gather_kv(k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """k, v [B, Hkv, T, D] and positions [B, N] -> kept k, v [B, Hkv, N, D] (all KV heads)."""
    index = rearrange(positions, "b n -> b 1 n 1").expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, index), v.gather(2, index)
