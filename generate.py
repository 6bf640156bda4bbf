"""Generate with a compressed KV cache: the Python API (prefill, compress, decode) and the CLI.

    python generate.py --chunk 10                       # pass-key demo, KV kept at 10 %
    python generate.py --prompt "What is the capital of France?" --method full
    python generate.py --context-file doc.txt --question "Who wrote it?" --question "When?"

    from generate import load, generate
    record = generate(model, prompt, CompressionConfig(keep=0.1))  # record.tokens [B, n]
"""
import math
import sys
import time
from dataclasses import replace

import torch
from torch import Tensor

import cli
from chunkkv import RECOMPRESSIBLE, CompressionConfig, CompressionError
from contexts import (CompressedContext, Prefilled, Record, Repeat, load_context,  # load_context: for the API
                      reconstruct_and_compress, save_context)
from devices import StepTimer, auto_dtype, host_copy, read, synchronize
from model import CacheRequest, PromptError, Transformer
from registry import check_device, load, resolve
from tokenizer import REPEAT_FIRST, REPEAT_LATER, CheckpointError, chat_format, repeat_prompts

STOP_CHECK = 8  # decode steps between host reads of whether every row has stopped (each read waits for the device)


# ---------------------------------------------------------------------------------------
# Sampling and the compiled step

def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None):
    """Raise PromptError for settings no generation can run (the CLI shows the same messages)."""
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
    # shift the best logit to 0 before dividing: a tiny temperature then gives -inf, never inf - inf = nan
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def compile_decode(model: Transformer):
    """The decode step as one graph (fullgraph): a CUDA graph on CUDA. On CPU, at batch 1, each weight is read in
    one fused pass (model.Linear) and the unfrozen graph is kept in Inductor's cache for later processes; more rows
    freeze the weights (later changes ignored) for autotuned C++ micro-GEMMs (docs/results.md, Speed). The caches'
    tensors go in as arguments, their slots dynamic: one graph up to 4,096 slots and one past (docs/results.md)."""
    def decode(token: Tensor, tensors: list[tuple]) -> Tensor:
        model.bind_caches(tensors)  # the caches' own tensors, read from the arguments
        return model.decode(token)
    cuda = model.embed_tokens.weight.is_cuda
    compiled = torch.compile(decode, fullgraph=True, **({"mode": "reduce-overhead"} if cuda else
                                                        {"options": {"max_autotune": True}}))

    def step(token: Tensor) -> Tensor:
        tensors = model.cache_tensors()
        for t in [] if cuda else [t for layer in tensors for t in layer[:3]]:  # k, v, pos: from the first trace on
            torch._dynamo.maybe_mark_dynamic(t, 2)
        # Dynamo reads `freezing` as it traces (in `options` it is ignored): patched per call; frozen, never cached
        with torch._inductor.config.patch(freezing=not cuda and token.shape[0] > 1):
            return compiled(token, tensors)
    return step


# ---------------------------------------------------------------------------------------
# Prefill and compress, decode

def batch_prompts(prompt: Tensor | list[list[int]], lengths, model: Transformer) -> tuple[Tensor, list[int]]:
    """(tokens [B, T] on the model's device, each row's length) from token-id lists of any lengths,
    or from a right-padded [B, T] int64/int32 tensor with its `lengths` [B] (default: every row fills T).
    Raises PromptError for any other shape and for ids outside the model's vocabulary. Right padding: no real
    token attends to the padding after it, so the prefill needs no mask and RoPE positions start at 0 unshifted."""
    if not isinstance(prompt, Tensor):
        if lengths is not None:
            raise PromptError("lengths go with a padded tensor of prompts; token-id lists carry their own lengths")
        try:
            lengths = [len(ids) for ids in prompt]
            prompt = torch.tensor([list(ids) + [0] * (max(lengths) - len(ids)) for ids in prompt] if lengths else [])
        except (TypeError, ValueError):  # not a list of lists of numbers
            raise PromptError("prompts are lists of token ids (lists of ints) or a [batch, tokens] tensor") from None
        if not lengths or min(lengths) == 0:
            raise PromptError("a prompt is empty: every prompt needs at least one token")
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.dtype not in (torch.int64, torch.int32):
        raise PromptError(f"prompts are int64/int32 token ids [batch, tokens], got {prompt.dtype} {tuple(prompt.shape)}")
    lengths = [prompt.shape[1]] * prompt.shape[0] if lengths is None else [int(n) for n in lengths]
    if len(lengths) != prompt.shape[0] or not all(1 <= n <= prompt.shape[1] for n in lengths):
        raise PromptError(f"lengths {lengths} do not fit prompts of shape {tuple(prompt.shape)}: "
                          f"give one length per row, each between 1 and {prompt.shape[1]}")
    real = torch.arange(prompt.shape[1], device=prompt.device) < torch.tensor(lengths, device=prompt.device)[:, None]
    if (bad := prompt[real & ((prompt < 0) | (prompt >= model.args.vocab_size))]).numel():
        raise PromptError(f"token id {bad[0].item()} is outside the model's vocabulary of {model.args.vocab_size}: "
                          "encode the prompt with this checkpoint's tokenizer")
    prompt = prompt.masked_fill(~real, 0)[:, :max(lengths)]  # padding as id 0, none past the longest row
    return prompt.to(model.embed_tokens.weight.device, torch.long), lengths


def check_prompt(model: Transformer, n_prompt: int, compression: CompressionConfig, max_new_tokens: int,
                 row: int | None = None) -> list[int]:
    """Each layer's budget for a prompt of `n_prompt` tokens, or an error naming the prompt of a batch."""
    try:
        model.check_room(n_prompt + max_new_tokens, f"a prompt of {n_prompt} tokens + {max_new_tokens} new tokens",
                         "shorten the prompt or lower max_new_tokens")
        return compression.layer_budgets(n_prompt, model.args.n_layers)
    except (PromptError, CompressionError) as e:
        raise (type(e)(f"prompt {row + 1}: {e}") if row is not None else e) from None


def prefill_and_compress(model: Transformer, prompt: Tensor, lengths: list[int], compression: CompressionConfig,
                         max_new_tokens: int, n_slots: int | None = None,
                         recompression: "Recompression | None" = None) -> tuple[Tensor, Prefilled]:
    """Prefill prompt [B, T] (rows of `lengths`, right-padded), compress every layer's cache leaving room for
    `max_new_tokens` (or, with `recompression`, at its cache budget): (last logits [B, vocab], the record)."""
    ragged, room = len(set(lengths)) > 1, max_new_tokens
    if recompression is not None:
        if ragged:
            raise PromptError("re-compression (a cache budget) runs on prompts of one length: "
                              "run prompts of different lengths one by one, or without a cache budget")
        compression, n_slots, room = recompression.config, recompression.cache_budget, recompression.room(lengths[0])
    budgets = [check_prompt(model, n, compression, max_new_tokens, row if ragged else None)
               for row, n in enumerate(lengths)]
    request = CacheRequest(compression, lengths, budgets, room, n_slots, tokens=prompt,
                           keep_queries=recompression is not None)
    start = time.perf_counter()
    logits, compress_seconds = model.prefill(prompt, request)
    synchronize(prompt.device)
    prefill_seconds = time.perf_counter() - start
    return logits, Prefilled.measured(model, lengths, budgets, room, n_slots, prefill_seconds, compress_seconds)


@torch.no_grad()
def decode_tokens(model: Transformer, logits: Tensor, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, stop_tokens: tuple[int, ...] = (), on_token=None, decode=None,
                  recompression: "Recompression | None" = None) -> tuple[Tensor, list[float], list[float]]:
    """Sample from `logits` [B, vocab], decode until every row stopped or max_new_tokens: (new ids [B, n], seconds
    of each steady step, of each warm-up step); `on_token(ids [B, 1] on the CPU)` sees each token once the next step
    is queued; `decode` replaces model.decode. Nothing is read back per step (the host queues CUDA steps while the
    device runs them): events time the steps, whether every row stopped is read every STOP_CHECK steps (each step
    with `recompression`), the steps past it taken back (KVCache.drop; `on_token` may see STOP_CHECK - 1 stop tokens
    more). Raises PromptError, before any step, when the caches cannot take the tokens or pass the context or window."""
    device = logits.device
    if recompression is None and max_new_tokens - 1 > (free := model.free_slots()):  # a step past the cache indexes out
        raise PromptError(f"{max_new_tokens} new tokens need {max_new_tokens - 1} free cache slots, the caches have "
                          f"{free}: leave more room when compressing, or lower max_new_tokens")
    length = int(model.caches()[0].length.max())  # positions run on past the slots under re-compression
    model.check_room(length + max_new_tokens, f"{length} tokens in the cache + {max_new_tokens} new tokens",
                     "lower max_new_tokens")
    decode, check_every = decode or model.decode, 1 if recompression is not None else STOP_CHECK
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    new_tokens, timer = [], StepTimer(device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k)
        if stop_tokens:
            token = torch.where(done[:, None], stop[0], token)  # finished rows repeat their stop token
            done |= torch.isin(token[:, 0], stop)
        new_tokens.append(token)
        shown = host_copy(token) if on_token is not None else None  # queued behind the sample, read later
        if i == max_new_tokens - 1 or (stop_tokens and (i + 1) % check_every == 0 and bool(done.all())):
            break
        if recompression is not None:
            recompression.make_room(model, 1)  # eager, outside the (compiled) step
        with timer.step():
            logits = decode(token).clone()  # clone: a CUDA-graph step reuses its output buffer
        if on_token is not None:
            on_token(read(shown))
    if on_token is not None:
        on_token(read(shown))
    tokens = torch.cat(new_tokens, dim=1)
    if stop_tokens and (past := int(torch.isin(tokens, stop).cummax(dim=1).values.all(dim=0).sum()) - 1) > 0:
        model.drop(past)  # the steps after every row stopped
        tokens = tokens[:, :-past]
    return tokens, *timer.seconds(tokens.shape[1] - 1)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor | list[list[int]], compression: CompressionConfig = CompressionConfig(),
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             stop_tokens: tuple[int, ...] = (), on_token=None, decode=None, n_slots: int | None = None,
             lengths: Tensor | list[int] | None = None, cache_budget: int | None = None) -> Record:
    """Prefill prompts [B, T] (or a ragged batch: token-id lists, or a right-padded tensor with `lengths` [B];
    each row is compressed alone and gives what it gives alone), compress each layer's KV cache as `compression`
    says, decode up to `max_new_tokens`: a Record, whose `tokens` are the new ids [B, n]. `decode` replaces
    `model.decode` (e.g. compile_decode(model)); `n_slots` fixes every cache's size; with `cache_budget` (see
    Recompression) no cache holds more entries and max_new_tokens may exceed it. Raises PromptError for a prompt
    beyond the context or empty, lengths that do not fit, a ragged batch with a cache budget, and sampling
    settings no generation can run; CompressionError for a budget or method that cannot work."""
    check_sampling(max_new_tokens, temperature, top_k)
    prompt, lengths = batch_prompts(prompt, lengths, model)
    recompression = Recompression(compression, cache_budget) if cache_budget is not None else None
    logits, prefilled = prefill_and_compress(model, prompt, lengths, compression, max_new_tokens, n_slots, recompression)
    tokens, *steps = decode_tokens(model, logits, max_new_tokens, temperature, top_k, stop_tokens, on_token, decode,
                                   recompression)
    count, seconds = (recompression.count, recompression.seconds) if recompression is not None else (0, 0.0)
    return Record(tokens, *steps, prefilled, recompressions=count, recompress_seconds=seconds)


# ---------------------------------------------------------------------------------------
# A cache that stays within a budget: compressed again whenever full

class Recompression:
    """A cache of `cache_budget` slots per layer, compressed again in place to `budget` entries (the
    config's absolute budget, else 3/4 of the cache budget; the prompt too) whenever the next tokens
    would not fit; counts the re-compressions and their seconds. The free slots are counted on the
    host (the loop knows what it wrote), so checking costs no sync."""

    def __init__(self, config: CompressionConfig, cache_budget: int):
        if not config.row.recompressible:
            raise CompressionError(f"method {config.method!r} cannot re-compress a full cache: "
                                   f"use one of {', '.join(RECOMPRESSIBLE)}")
        if config.keep is not None:
            raise CompressionError("keep is a fraction of the prompt; a re-compressed cache needs an absolute "
                                   "budget (or none: 3/4 of the cache budget)")
        budget = config.budget if config.budget is not None else cache_budget * 3 // 4
        if not config.min_budget <= budget < cache_budget:
            raise CompressionError(f"re-compression keeps {budget} entries in a cache of {cache_budget}: it needs "
                                   f"{config.protected} < budget < cache budget; raise the cache budget "
                                   f"or lower the budget")
        self.config = replace(config, budget=budget)
        self.cache_budget, self.budget = cache_budget, budget
        self.count, self.seconds = 0, 0.0
        self.free: int | None = None  # free slots of the fullest row; None: ask the caches

    def room(self, n_prompt: int) -> int:
        """Slots free after a prompt of `n_prompt` tokens is compressed to the budget."""
        return self.cache_budget - min(self.budget, n_prompt)

    def make_room(self, model: Transformer, n_new: int):
        """Re-compress when `n_new` tokens do not fit; then count them as written."""
        if self.free is None:
            self.free = model.free_slots()
        if n_new > self.free:
            synchronize(model.embed_tokens.weight.device)  # the queued steps are not re-compression
            start = time.perf_counter()
            for cache in model.caches():  # each layer compresses its full rows again
                cache.recompress(self.config, self.budget, n_new)
            synchronize(model.embed_tokens.weight.device)
            self.seconds += time.perf_counter() - start
            self.count += 1
            self.free = model.free_slots()
        self.free -= n_new


@torch.no_grad()
def extend_all(model: Transformer, tokens: Tensor, recompression: Recompression) -> Tensor:
    """Append tokens [B, T'] of any length, re-compressing whenever the cache is full: they go in as
    pieces that fill the free slots, so re-compressions fall where decoding the tokens one by one
    would put them. Logits of every appended token [B, T', vocab] (teacher forcing)."""
    if recompression.free is None:
        recompression.free = model.free_slots()
    logits, start = [], 0
    while start < tokens.shape[1]:
        piece = tokens[:, start:start + (recompression.free or recompression.cache_budget - recompression.budget)]
        recompression.make_room(model, piece.shape[1])
        logits.append(model.extend(piece))
        start += piece.shape[1]
    return torch.cat(logits, dim=1)


# ---------------------------------------------------------------------------------------
# Compress once, ask many (query-agnostic)

@torch.no_grad()
def compress_context(model: Transformer, context: Tensor, compression: CompressionConfig = CompressionConfig(),
                     max_new_tokens: int = 256, n_slots: int | None = None, repeat: Repeat | None = None
                     ) -> CompressedContext:
    """Prefill the context [B, T] alone and compress its KV cache, query-agnostic: the context's own last
    `window` tokens are the observation window (NVIDIA kvpress's setting; the paper's query-aware setting puts
    the question in the window), or with the scorer "reconstruct" (kvzip's, or CompressionConfig.scorer) a
    teacher-forced repeat of the context, as `repeat` says, scores it (contexts.reconstruct_and_compress).
    `max_new_tokens` cache slots per layer stay free for each question plus its answer. Raises PromptError
    when the context + max_new_tokens exceed the model's context, CompressionError for an impossible budget."""
    prompt, lengths = batch_prompts(context, None, model)
    if compression.scoring == "reconstruct":
        prefilled = reconstruct_and_compress(model, prompt, compression, repeat, max_new_tokens, n_slots)
    else:
        _, prefilled = prefill_and_compress(model, prompt, lengths, compression, max_new_tokens, n_slots)
    free = min(model.free_slots(), model.args.max_seq_len - prompt.shape[1])
    return CompressedContext(prompt.shape[1], free, model.snapshot(), prefilled, compression, prompt)


@torch.no_grad()
def answer(model: Transformer, context: CompressedContext, question: Tensor, max_new_tokens: int = 64,
           temperature: float = 0.0, top_k: int | None = None, stop_tokens: tuple[int, ...] = (), on_token=None,
           decode=None) -> Record:
    """Answer `question` [B, Tq] from a compressed context: the caches are restored to their state right
    after compression (no K/V copy), the question is appended at positions T, T+1, ..., then the answer is
    decoded (options as in `generate`). Answering question 2 after question 1 gives exactly what question 2
    alone gives. Raises PromptError when question and answer do not fit in the free slots or the model's
    context or window, and for the sampling settings `generate` refuses."""
    check_sampling(max_new_tokens, temperature, top_k)
    question, _ = batch_prompts(question, None, model)
    if question.shape[1] + max_new_tokens > context.free_slots:
        raise PromptError(f"a question of {question.shape[1]} tokens + {max_new_tokens} new tokens does not fit "
                          f"in the {context.free_slots} cache slots compress_context left free: pass a larger "
                          f"max_new_tokens to compress_context, or shorten the question")
    model.check_room(context.n_tokens + question.shape[1] + max_new_tokens, f"a context of {context.n_tokens} tokens, "
                     f"a question of {question.shape[1]} and {max_new_tokens} new tokens", "shorten them")
    model.restore(context.snapshot)
    start = time.perf_counter()
    logits = model.extend(question)[:, -1]
    synchronize(question.device)
    extend_seconds = time.perf_counter() - start
    tokens, *steps = decode_tokens(model, logits, max_new_tokens, temperature, top_k, stop_tokens, on_token, decode)
    return Record(tokens, *steps, extend_seconds=extend_seconds)


# ---------------------------------------------------------------------------------------
# Command line: the sessions, and main (arguments and text: cli.py)

def run_one(model, tokenizer, config, args, text: str, key: str | None, chat, decode) -> int:
    """A single prompt (or the pass-key demo): streamed answer, summary."""
    shown = text if len(text) <= 300 else f"{text[:150]} [...] {text[-150:]}"
    encoded = cli.encode_prompt(tokenizer, text, chat)
    prompt = torch.tensor([encoded.ids], device=model.embed_tokens.weight.device)
    if prompt.shape[1] == 0:
        raise PromptError("the prompt is empty: pass some text with --prompt or --prompt-file")
    max_new_tokens = args.max_new_tokens or (16 if key is not None else 64)
    check_prompt(model, prompt.shape[1], config, max_new_tokens)  # fail before printing anything
    if key is not None:
        print(f"Pass-key demo: the pass key {key} is hidden in a {prompt.shape[1]}-token prompt that asks for it.")
    else:
        print(f"Prompt ({prompt.shape[1]} tokens{', chat template' if chat else ''}): {shown.strip()}")
    print("--- answer ---")
    stream = cli.TextStream(tokenizer, args.stop_ids)
    record = generate(model, prompt, config, max_new_tokens, args.temperature, args.top_k, args.stop_ids,
                      on_token=stream, decode=decode, cache_budget=args.cache_budget)
    stream.flush()
    print("\n---\n" + cli.record_summary(record, config, model.args.n_layers, args.cache_budget))
    if key is not None:
        print(cli.passkey_report(model, config, encoded, key, stream.printed))
    return 0


def run_batch(model, tokenizer, config, args, batch: list[tuple[str, str]], chat, decode) -> int:
    """Prompts of any lengths prefilled, compressed (each row with its own budget) and decoded as
    one ragged batch; each answer printed after the batch finished."""
    rows = [cli.encode_prompt(tokenizer, text, chat).ids for _, text in batch]
    max_new_tokens = args.max_new_tokens or 64
    for i, ids in enumerate(rows):  # fail before printing anything
        if not ids:
            raise PromptError(f"prompt {batch[i][0]} is empty: put some text in it")
        check_prompt(model, len(ids), config, max_new_tokens, i)
    print(f"{len(rows)} prompts ({', '.join(str(len(ids)) for ids in rows)} tokens) as one batch"
          f"{', chat template' if chat else ''}.")
    record = generate(model, rows, config, max_new_tokens, args.temperature, args.top_k, args.stop_ids, decode=decode)
    print(cli.batch_answers(tokenizer, [name for name, _ in batch], record.tokens, args.stop_ids))
    print("---\n" + cli.record_summary(record, config, model.args.n_layers))
    return 0


def run_questions(model, tokenizer, config, args, context: str, questions: list[str] | None, key: str | None, chat,
                  decode, loaded: CompressedContext | None = None) -> int:
    """Query-agnostic: compress the context once (or take the one --load-cache `loaded`), save it
    (--save-cache), answer each question from it."""
    context, config = (loaded.text, loaded.config) if loaded is not None else (context, config)
    if not context.strip():
        raise PromptError("the context is empty: put some text in --context-file")
    repeating = config.scoring == "reconstruct" and loaded is None  # KVzip's prompts: cut where the questions are
    asked = (questions or [cli.STAND_IN]) + ([REPEAT_FIRST, REPEAT_LATER] if repeating else [])
    encoded, asks = cli.split_prompt(tokenizer, context, asked, chat)
    repeat, asks = (Repeat(*repeat_prompts(tokenizer, asks[-2:], chat)), asks[:-2]) if repeating else (None, asks)
    asks, max_new_tokens = [torch.tensor([ids]) for ids in asks], args.max_new_tokens or (16 if key else 64)
    room = max(ids.shape[1] for ids in asks) + max_new_tokens  # slots each question + answer needs
    compressed = loaded
    if compressed is not None:
        cli.check_loaded(args.load_cache, compressed, encoded.ids, room, max_new_tokens)
    else:
        if args.save_cache is not None:  # room for the questions of later runs too
            room = max(room, cli.SAVED_QUESTION + max_new_tokens)
        model.check_room(len(encoded.ids) + room, f"the context of {len(encoded.ids)} tokens + the longest question "
                         f"of {room - max_new_tokens} + {max_new_tokens} new tokens",
                         "shorten them or lower --max-new-tokens")
        config.layer_budgets(len(encoded.ids), model.args.n_layers)  # an impossible budget: fail before printing
        what = f"the pass-key demo's context (key {key})" if key is not None else f"context from {args.context_file}"
        then = f"; then {len(questions)} question{'s' if len(questions) > 1 else ''}" if questions else ""
        print(f"Compressing {what}, {len(encoded.ids)} tokens{', chat template' if chat else ''}, once, "
              f"without the questions{then}.")
        compressed = replace(compress_context(model, torch.tensor([encoded.ids]), config, room, repeat=repeat),
                             text=context, chat=chat is not None)
        if args.save_cache is not None:
            n_bytes = save_context(args.save_cache, model, tokenizer, compressed)
            print(f"Saved the compressed context to {args.save_cache} ({n_bytes / 2 ** 20:.2f} MiB); ask it questions "
                  f"with --load-cache {args.save_cache}", flush=True)
    answers, records = [], []
    for i, (question, ids) in enumerate(zip(questions or [], asks), start=1):
        print(f"--- question {i}: {question.strip()} ---")
        stream = cli.TextStream(tokenizer, args.stop_ids)
        records.append(answer(model, compressed, ids, max_new_tokens, args.temperature, args.top_k, args.stop_ids,
                              on_token=stream, decode=decode))
        stream.flush()
        answers.append(stream.printed)
        print()
    print("---\n" + cli.questions_summary(compressed.prefill, records, asks, config, model.args.n_layers,
                                        args.load_cache))
    if key is not None and questions:
        print(cli.passkey_report(model, config, encoded, key, answers))
    return 0


def run_chat(model, tokenizer, config, args, chat, decode, lines) -> int:
    """--interactive: each line of `lines` is a user turn, rendered with the chat template (or plain
    with --no-chat), appended to one cache, re-compressed whenever full (never over --cache-budget
    entries), and answered with a streamed reply and a line of occupancy. Ends on EOF or Ctrl-C."""
    recompression = Recompression(config, args.cache_budget)
    max_new_tokens = args.max_new_tokens or 256
    device = model.embed_tokens.weight.device
    print(f"Chat with {config.method}: at most {recompression.cache_budget} KV entries per layer, compressed again "
          f"to {recompression.budget} whenever full. One line per turn; end with Ctrl-D or Ctrl-C.", flush=True)
    messages = []
    try:
        for line in lines:
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            ids = torch.tensor([cli.turn_ids(tokenizer, messages, chat)], device=device)
            length = int(model.caches()[0].length.max()) if len(messages) > 1 else 0
            model.check_room(length + ids.shape[1] + max_new_tokens, "the conversation with the next reply",
                             "start a new session, or lower --max-new-tokens")
            if len(messages) == 1:  # the first turn is the prompt: prefilled, compressed if longer than the budget
                logits, _ = prefill_and_compress(model, ids, [ids.shape[1]], config, max_new_tokens,
                                                 recompression=recompression)
                recompression.free = None
            else:
                logits = extend_all(model, ids, recompression)[:, -1]
            stream = cli.TextStream(tokenizer, args.stop_ids)
            new = decode_tokens(model, logits, max_new_tokens, args.temperature, args.top_k, args.stop_ids, stream,
                                decode, recompression)[0][0].tolist()
            stream.flush()
            if new[-1] in args.stop_ids:  # never written to the cache: the template writes the turn's end its own way
                new = new[:-1]
            else:  # cut short by --max-new-tokens: the last token was sampled but not yet written
                extend_all(model, torch.tensor([new[-1:]], device=device), recompression)
            messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
            used = max(int(cache.used.max()) for cache in model.caches())
            print(f"\n[cache: {used} of {recompression.cache_budget} entries used, {recompression.count} "
                  f"re-compressions so far]", flush=True)
    except KeyboardInterrupt:
        print()
    return 0


def main(argv=None) -> int:
    args = cli.parse_args(argv, __doc__.split("\n\n    from")[0])
    kind = cli.session(args)
    try:
        check_sampling(1 if args.max_new_tokens is None else args.max_new_tokens, args.temperature, args.top_k)
        config = CompressionConfig(method=args.method, keep=args.keep, budget=args.budget, window=args.window,
                                   chunk_size=args.chunk, reuse=args.reuse, per_head=args.per_head,
                                   recovery=args.recovery, scorer=args.scorer, global_budget=args.global_budget)
        if config.scoring == "reconstruct" and kind != "questions":  # refused before loading, as a cache budget is
            raise CompressionError("the reconstruct scorer repeats a context compressed before its questions: use "
                                   "--context-file (or the demo's context) with --question, or --save-cache")
        if args.cache_budget is not None:  # refuse an unsupported method or budget before loading
            Recompression(config, args.cache_budget)
        text, key, questions, batch = cli.read_inputs(args, kind)
        device = check_device(args.device)
        dtype = auto_dtype(device, args.weights) if args.dtype == "auto" else getattr(torch, args.dtype)
        model, tokenizer = load(args.checkpoint, device=device, dtype=dtype, weights=args.weights)  # checks, then fetches
        checkpoint_path = resolve(args.checkpoint)  # a name's folder, fetched by load
        max_bytes = cli.check_sizes(args, tokenizer, model.args.max_seq_len, text, questions, batch)
        cli.fit_cache_budget(args, model.args.max_seq_len)
        config = Recompression(config, args.cache_budget).config if args.cache_budget is not None else config
        if config.method == "fastgen":
            special, punctuation = cli.fastgen_token_ids(tokenizer)
            config = replace(config, special_ids=special, punctuation_ids=punctuation)
        chat_form = chat_format(checkpoint_path)
        loaded = cli.load_cache(args, model, tokenizer) if args.load_cache is not None else None  # its --chat wins
        wrap = args.chat if args.chat is not None else key is None and chat_form.template
        chat = chat_form if (loaded.chat if loaded else wrap) else None
        args.stop_ids = chat_form.stop_ids
        torch.manual_seed(args.seed)
        decode = compile_decode(model) if args.compile else None
        if args.compile_prefill:
            model.prefill = torch.compile(model.prefill, dynamic=True)
        if kind == "interactive":
            return run_chat(model, tokenizer, config, args, chat, decode, cli.text_lines(sys.stdin, max_bytes))
        if kind == "batch":
            return run_batch(model, tokenizer, config, args, batch, chat, decode)
        if kind == "questions":
            return run_questions(model, tokenizer, config, args, text, questions, key, chat, decode, loaded)
        return run_one(model, tokenizer, config, args, text, key, chat, decode)
    except (CompressionError, CheckpointError, PromptError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
