"""Generate with a compressed KV cache, the Python API: `load`, `generate` (prefill, compress,
decode), `compress_context` + `answer` for many questions about one context, and `extend`
through a cache compressed again whenever full (`Recompression`). generate.py is the command
line on top of it; bench.py measures it.

    from inference import load, generate
"""
import math
import random
import string
import time
from dataclasses import dataclass, replace

import torch
from tokenizers import Tokenizer
from torch import Tensor

from chunkkv import RECOMPRESSIBLE, CompressionConfig, CompressionError
from model import Prefill, Transformer
from registry import load
from tokenizer import chat_format

__all__ = ["load", "chat_format", "generate", "compress_context", "answer", "CompressedContext", "compile_decode",
           "passkey_prompt", "Recompression", "extend", "extend_all"]


class PromptError(ValueError):
    """A prompt or generation setting that cannot be run; the message says how to fix it."""


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None):
    """Raise PromptError for settings `generate` cannot run (the CLI shows the same messages)."""
    if max_new_tokens < 1:
        raise PromptError(f"max new tokens must be at least 1, got {max_new_tokens}: ask for at least one token")
    if not 0 <= temperature < math.inf:  # also refuses nan
        raise PromptError(f"temperature must be a finite number >= 0, got {temperature}: 0 is greedy")
    if top_k is not None and top_k < 1:
        raise PromptError(f"top-k must be at least 1, got {top_k}: leave it out to sample from the whole vocabulary")


def sample(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """logits [B, vocab] -> token ids [B, 1]; greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # shift the best logit to 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def compile_decode(model: Transformer):
    """The decode step as one graph: no breaks (fullgraph), no recompiles for new prompt lengths,
    methods or budgets while the cache size stays the same. On CUDA it is replayed as a CUDA
    graph ("reduce-overhead"). On CPU the weights are frozen into the graph and every matmul is
    autotuned: Inductor's C++ micro-GEMM on pre-packed weights reads a decode step's weights
    2-3x as fast as MKL's matrix-vector product (README, Speed). So the step ignores
    later changes to the weights, and keeps a packed copy of them beside the model's own
    (the eager prefill reads those): budget the memory."""
    if model.lm_head.weight.is_cuda:
        return torch.compile(model.decode, fullgraph=True, mode="reduce-overhead")
    compiled = torch.compile(model.decode, fullgraph=True, options={"max_autotune": True})

    def step(token: Tensor) -> Tensor:
        # Dynamo reads `freezing` while it traces, so it cannot go in `options`; patched per call,
        # it reaches every (re)compile of this step and no other torch.compile in the process
        with torch._inductor.config.patch(freezing=True):
            return compiled(token)
    return step


def auto_dtype(device: torch.device) -> torch.dtype:
    """--dtype auto: bfloat16 on CUDA, and on CPUs with native bfloat16 dot products (AVX512-BF16
    or AMX), where it prefilled 1.3-2.6x faster than float32 here (README, Speed);
    float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16
    # private helpers, but the only way torch tells which instructions its kernels may use
    native_bf16 = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return torch.bfloat16 if native_bf16 else torch.float32


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_prompt(model: Transformer, n_prompt: int, compression: CompressionConfig, max_new_tokens: int) -> list[int]:
    """Each layer's budget for this prompt, or an error if it cannot run."""
    context = model.args.max_seq_len
    if n_prompt + max_new_tokens > context:
        raise PromptError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's "
                          f"context of {context}: shorten the prompt or lower max_new_tokens")
    window = model.args.sliding_window
    if window is not None and n_prompt + max_new_tokens > window:  # full attention is exact only inside it
        raise PromptError(f"prompt of {n_prompt} tokens + {max_new_tokens} new tokens exceeds the model's sliding "
                          f"window of {window}: chunkkv runs sliding-window models only within the window; "
                          "shorten the prompt or lower max_new_tokens")
    return compression.layer_budgets(n_prompt, model.args.n_layers)


def batch_prompts(prompt: Tensor | list[list[int]], lengths: Tensor | list[int] | None,
                  device: torch.device) -> tuple[Tensor, list[int] | None]:
    """(tokens [B, T], each row's length, or None when every row fills T) from token-id lists of
    any lengths, or from a right-padded [B, T] tensor with its `lengths` [B].

    Right padding, not left: under causal attention a real token never sees the padding after
    it, so the prefill needs no mask and every row's RoPE positions start at 0 unshifted; each
    row's last logits are read at its own length - 1, and compression slices each row's real
    tokens. Raises PromptError for an empty prompt or lengths that do not fit the tensor."""
    if not isinstance(prompt, Tensor):
        if lengths is not None:
            raise PromptError("lengths go with a padded tensor of prompts; token-id lists carry their own lengths")
        lengths = [len(ids) for ids in prompt]
        if not lengths or min(lengths) == 0:
            raise PromptError("a prompt is empty: every prompt needs at least one token")
        prompt = torch.tensor([list(ids) + [0] * (max(lengths) - len(ids)) for ids in prompt], device=device)
    elif lengths is None:
        return prompt, None
    lengths = [int(n) for n in lengths]
    if len(lengths) != prompt.shape[0] or not all(1 <= n <= prompt.shape[1] for n in lengths):
        raise PromptError(f"lengths {lengths} do not fit prompts of shape {tuple(prompt.shape)}: "
                          f"give one length per row, each between 1 and {prompt.shape[1]}")
    prompt = prompt[:, :max(lengths)]  # nobody's tokens past the longest row
    return prompt, (None if min(lengths) == prompt.shape[1] else lengths)


class Recompression:
    """A cache that never outgrows `cache_budget` entries per layer (its slots): whenever the
    next tokens would not fit, every layer is compressed again, in place, to `budget` entries
    with `config`'s method (chunkkv, snapkv or streaming); the `cache_budget - budget` slots
    freed take the next tokens. `budget` defaults to the config's absolute budget, else 3/4 of
    the cache budget. Counts the re-compressions and their seconds.

    The decode loop keeps the free slots on the host (it knows how many tokens it wrote), so
    checking costs no sync; re-compression itself is eager, between decode steps."""

    def __init__(self, config: CompressionConfig, cache_budget: int):
        if config.method not in RECOMPRESSIBLE:
            raise CompressionError(f"method {config.method!r} cannot re-compress a full cache: "
                                   f"use one of {', '.join(RECOMPRESSIBLE)}")
        budget = config.budget if config.budget is not None else cache_budget * 3 // 4
        if not config.window < budget < cache_budget:
            raise CompressionError(f"re-compression keeps {budget} entries in a cache of {cache_budget}: it needs "
                                   f"window ({config.window}) < budget < cache budget; raise the cache budget "
                                   f"or lower the budget")
        self.config = replace(config, budget=budget)  # the prompt is compressed to the same budget
        self.cache_budget, self.budget = cache_budget, budget
        self.count, self.seconds = 0, 0.0
        self.free: int | None = None  # free slots of the fullest row; None: ask the caches

    def make_room(self, model: Transformer, n_new: int):
        """Re-compress when `n_new` tokens do not fit; then count them as written."""
        if self.free is None:
            self.free = min(cache.free_slots() for cache in model.caches())
        if n_new > self.free:
            start = time.perf_counter()
            model.recompress(self.config, self.budget, n_new)
            synchronize(model.lm_head.weight.device)
            self.seconds += time.perf_counter() - start
            self.count += 1
            self.free = min(cache.free_slots() for cache in model.caches())
        self.free -= n_new

    def occupancy(self, model: Transformer) -> str:
        used = max(int(cache.used.max()) for cache in model.caches())
        return f"{used} of {self.cache_budget} entries used, {self.count} re-compressions so far"


@torch.no_grad()
def extend(model: Transformer, tokens: Tensor, recompression: Recompression) -> Tensor:
    """Append tokens [B, T'] of any length, re-compressing whenever the cache is full: they go in
    as pieces that fill the free slots, so re-compressions fall where decoding the tokens one by
    one would put them. Logits of the last token [B, vocab]."""
    return extend_all(model, tokens, recompression)[:, -1]


@torch.no_grad()
def extend_all(model: Transformer, tokens: Tensor, recompression: Recompression) -> Tensor:
    """`extend` with the logits of every appended token [B, T', vocab] (teacher forcing)."""
    if recompression.free is None:
        recompression.free = min(cache.free_slots() for cache in model.caches())
    logits, start = [], 0
    while start < tokens.shape[1]:
        room = recompression.free or recompression.cache_budget - recompression.budget  # 0: a re-compression frees it
        piece = tokens[:, start:start + room]
        recompression.make_room(model, piece.shape[1])
        logits.append(model.extend(piece))
        start += piece.shape[1]
    return torch.cat(logits, dim=1)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor | list[list[int]], compression: CompressionConfig = CompressionConfig(),
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             stop_tokens: tuple[int, ...] = (), on_token=None, decode=None, n_slots: int | None = None,
             stats: dict | None = None, lengths: Tensor | list[int] | None = None,
             cache_budget: int | None = None) -> Tensor:
    """New token ids [B, n] (n <= max_new_tokens) for prompts [B, T], or a ragged batch: a list of
    token-id lists, or a right-padded [B, T] tensor with each row's `lengths` [B].

    The prompt is prefilled with full attention, each layer's KV cache is compressed as
    `compression` says, then tokens are decoded one at a time through the cache. In a ragged
    batch each row is compressed alone with its own budget (keep x its length) and window; its
    padding is never scored, kept or attended, and every row gives what it gives alone. Rows that
    reach a stop token are padded with it until every row has stopped. `on_token(ids [B, 1])`
    sees each new token as it is made; `decode` replaces `model.decode` (e.g. a compiled one);
    `n_slots` fixes every layer's cache size (so one compiled graph serves many prompts and
    length mixes); a `stats` dict receives timings and cache sizes. With `cache_budget` (see
    Recompression) every layer's cache holds at most that many entries and is compressed again
    whenever full, so max_new_tokens may exceed it; stats then also get recompressions and
    recompress_seconds. Raises PromptError for a prompt beyond the context or empty, lengths that
    do not fit, a ragged batch with a cache budget, and for max_new_tokens or top_k below 1 or a
    negative or non-finite temperature; CompressionError for an impossible budget or a method or
    budget that cannot re-compress.
    """
    check_sampling(max_new_tokens, temperature, top_k)
    prompt, lengths = batch_prompts(prompt, lengths, model.lm_head.weight.device)
    recompression = None
    if cache_budget is not None:
        if lengths is not None:
            raise PromptError("re-compression (a cache budget) runs on prompts of one length: "
                              "run prompts of different lengths one by one, or without a cache budget")
        recompression = Recompression(compression, cache_budget)
        compression, n_slots = recompression.config, cache_budget
        check_prompt(model, prompt.shape[1], compression, max_new_tokens)  # the context still bounds the length
    room = max_new_tokens if recompression is None else cache_budget - min(recompression.budget, prompt.shape[1])
    logits, prefill_stats = prefill_and_compress(model, prompt, compression, room, n_slots, lengths,
                                                 recompression is not None)
    new_tokens, step_seconds = decode_tokens(model, logits, max_new_tokens, temperature, top_k, stop_tokens,
                                             on_token, decode, recompression)
    if stats is not None:
        stats.update(prefill_stats, new_tokens=new_tokens.shape[1], decode_step_seconds=step_seconds)
        if recompression is not None:
            stats.update(recompressions=recompression.count, recompress_seconds=recompression.seconds,
                         cache_budget=cache_budget, recompress_budget=recompression.budget)
    return new_tokens


def prefill_and_compress(model: Transformer, prompt: Tensor | list[list[int]], compression: CompressionConfig,
                         max_new_tokens: int, n_slots: int | None, lengths: Tensor | list[int] | None = None,
                         keep_queries: bool = False) -> tuple[Tensor, dict]:
    """Prefill and compress `prompt` [B, T] (or a ragged batch, as `generate` takes it), leaving
    `max_new_tokens` free slots per layer (keep_queries: ready for re-compression); (last logits
    [B, vocab], timings and cache sizes)."""
    prompt, lengths = batch_prompts(prompt, lengths, model.lm_head.weight.device)
    n_batch, n_prompt = prompt.shape
    if lengths is None:
        budgets = check_prompt(model, n_prompt, compression, max_new_tokens)
        prefill = Prefill(compression, prompt, budgets, max_new_tokens, n_slots, keep_queries=keep_queries)
    else:
        budgets = [row_budgets(model, i, n, compression, max_new_tokens) for i, n in enumerate(lengths)]
        prefill = Prefill(compression, prompt, budgets[lengths.index(n_prompt)], max_new_tokens, n_slots,
                          lengths=lengths, row_budgets=budgets)
    start = time.perf_counter()
    logits = model.prefill(prompt, prefill)
    synchronize(prompt.device)
    entry_bytes = 2 * model.args.n_kv_heads * model.args.head_dim * model.lm_head.weight.element_size()
    lengths = lengths or [n_prompt] * n_batch
    row_kept = [[(cache.positions[row] >= 0).sum(-1).float().mean().item() for cache in model.caches()]
                for row in range(n_batch)]  # [row][layer], mean over KV heads
    return logits, dict(prompt_tokens=n_prompt, lengths=lengths, budgets=budgets, kept=prefill.kept,
                        row_kept=row_kept, stored=prefill.stored, prefill_seconds=time.perf_counter() - start,
                        compress_seconds=prefill.compress_seconds,
                        kv_bytes_full=entry_bytes * sum(lengths) * model.args.n_layers,
                        kv_bytes_kept=entry_bytes * n_batch * sum(prefill.stored))


def row_budgets(model: Transformer, row: int, n_prompt: int, compression: CompressionConfig,
                max_new_tokens: int) -> list[int]:
    """check_prompt for one row of a ragged batch; errors name the prompt (1-based)."""
    try:
        return check_prompt(model, n_prompt, compression, max_new_tokens)
    except (PromptError, CompressionError) as e:
        raise type(e)(f"prompt {row + 1}: {e}") from None


@torch.no_grad()
def decode_tokens(model: Transformer, logits: Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                  stop_tokens: tuple[int, ...], on_token, decode,
                  recompression: Recompression | None = None) -> tuple[Tensor, list[float]]:
    """Sample from `logits` [B, vocab], then decode through the cache until every row stopped
    or max_new_tokens: (new ids [B, n], seconds of each decode step, re-compressions excluded)."""
    device = logits.device
    decode = decode or model.decode
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    new_tokens, step_seconds = [], []
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k)
        if stop_tokens:
            token = torch.where(done[:, None], stop[0], token)  # finished rows repeat their stop token
            done |= torch.isin(token[:, 0], stop)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        if recompression is not None:
            recompression.make_room(model, 1)  # eager, outside the (compiled) step
        start = time.perf_counter()
        logits = decode(token).clone()  # clone: a CUDA-graph step reuses its output buffer
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    return torch.cat(new_tokens, dim=1), step_seconds


# ---------------------------------------------------------------------------------------
# Compress once, ask many (query-agnostic)

@dataclass
class CompressedContext:
    """A context prefilled and compressed once, before any question was seen. The compressed
    caches live in the model; this records their state right after compression and what it
    cost. A later prefill or compression on the same model invalidates it."""
    n_tokens: int  # context tokens T
    free_slots: int  # cache slots left for each question and its answer
    snapshot: list  # model.snapshot() right after compression
    stats: dict  # prefill_seconds, compress_seconds, budgets, kept, stored, kv_bytes_full, kv_bytes_kept


@torch.no_grad()
def compress_context(model: Transformer, context: Tensor, compression: CompressionConfig = CompressionConfig(),
                     max_new_tokens: int = 256, n_slots: int | None = None) -> CompressedContext:
    """Prefill the context [B, T] alone and compress its KV cache, query-agnostic: the
    context's own last `window` tokens are the observation window (NVIDIA kvpress's setting;
    the paper's query-aware setting puts the question in the window instead).

    `max_new_tokens` cache slots per layer stay free for each question plus its answer.
    Raises PromptError when the context + max_new_tokens exceed the model's context, and
    CompressionError for an impossible budget.
    """
    _, stats = prefill_and_compress(model, context, compression, max_new_tokens, n_slots)
    free = min([cache.free_slots() for cache in model.caches()] + [model.args.max_seq_len - context.shape[1]])
    return CompressedContext(context.shape[1], free, model.snapshot(), stats)


@torch.no_grad()
def answer(model: Transformer, context: CompressedContext, question: Tensor, max_new_tokens: int = 64,
           temperature: float = 0.0, top_k: int | None = None, stop_tokens: tuple[int, ...] = (), on_token=None,
           decode=None, stats: dict | None = None) -> Tensor:
    """New token ids [B, n] (n <= max_new_tokens) answering `question` [B, Tq] from a
    compressed context: the caches are restored to their state right after compression (no
    K/V copy), the question is appended with `model.extend` at positions T, T+1, ..., then the
    answer is decoded. Answering question 2 after question 1 gives exactly what question 2
    alone gives. Options as in `generate`; `stats` receives extend_seconds and decode steps.
    Raises PromptError when the question and answer do not fit in the context's free slots.
    """
    n_question = question.shape[1]
    if n_question == 0:
        raise PromptError("the question is empty: pass some text")
    if n_question + max_new_tokens > context.free_slots:
        raise PromptError(f"a question of {n_question} tokens + {max_new_tokens} new tokens does not fit in the "
                          f"{context.free_slots} cache slots compress_context left free: pass a larger "
                          f"max_new_tokens to compress_context, or shorten the question")
    model.restore(context.snapshot)
    start = time.perf_counter()
    logits = model.extend(question)[:, -1]
    synchronize(question.device)
    extend_seconds = time.perf_counter() - start
    new_tokens, step_seconds = decode_tokens(model, logits, max_new_tokens, temperature, top_k, stop_tokens,
                                             on_token, decode)
    if stats is not None:
        stats.update(question_tokens=n_question, extend_seconds=extend_seconds, new_tokens=new_tokens.shape[1],
                     decode_step_seconds=step_seconds)
    return new_tokens


# ---------------------------------------------------------------------------------------
# Prompts

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(n_filler: int = 80, seed: int = 0) -> tuple[str, str]:
    """(prompt, pass key): a random 5-digit key hidden at a random depth in ~2,000 tokens of
    filler, asked for at the end, in plain completion format."""
    context, key = passkey_context(n_filler, seed)
    return context + PASSKEY_QUESTION, key


def passkey_context(n_filler: int = 80, seed: int = 0) -> tuple[str, str]:
    """(context, pass key): the pass-key demo's prompt up to its question (ends with a newline)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    depth = rng.randint(n_filler // 10, n_filler * 9 // 10)
    haystack = FILLER * depth + needle + FILLER * (n_filler - depth)
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n")
    return f"{intro}{haystack}\n", key


def fastgen_token_ids(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(special, punctuation) token ids, FastGen's two cheapest policies."""
    special = tuple(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    punctuation = tuple(i for i in range(tokenizer.get_vocab_size()) if i not in special and
                        (text := tokenizer.decode([i]).strip()) and all(ch in string.punctuation for ch in text))
    return special, punctuation
