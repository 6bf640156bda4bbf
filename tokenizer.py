"""Text <-> token ids for checkpoints, and the chat format each checkpoint asks for.

A GGUF file stores its byte-level BPE tokenizer as metadata (vocabulary, merges, special
tokens) plus the *name* of a pre-tokenizer, `tokenizer.ggml.pre`, whose split rules live in
llama.cpp's `src/llama-vocab.cpp`. `gguf_tokenizer` rebuilds it as a `tokenizers.Tokenizer`
for the names implemented here and refuses any other by name. `chat_format` reads a
checkpoint's chat template and stop tokens (Hugging Face directory or GGUF file); templates
are untrusted input and render in jinja2's sandbox, with the globals and filters transformers
gives them, so a prompt equals `apply_chat_template(..., add_generation_prompt=True)`. Only a
template's own markup becomes special tokens: `ChatFormat.encode` and `encode_text` keep what a
user wrote as text, and `ChatFormat.turn_ids`/`split` tokenize chat turns and questions for a
cache that already holds what came before.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from model import PromptError
from templates import bounded_render, compile_template


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, fetched or read; the message says how to fix it."""


# ---------------------------------------------------------------------------------------
# GGUF tokenizers

# How text is cut before BPE, per `tokenizer.ggml.pre` (llama.cpp's src/llama-vocab.cpp and the
# models' own tokenizer.json). Each piece is then mapped byte by byte to GPT-2's characters.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # numbers in runs of up to 3 digits
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # every digit on its own


def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    # GPT-2's own split (contractions, letters, digit runs, punctuation, spaces); also what
    # transformers and chunkkv use for a file that names no pre-tokenizer
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM2 (the default model): every digit on its own, then GPT-2's split
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: split_then_bytes(LLAMA3_SPLIT),  # Llama 3.x, DeepSeek-R1-Distill-Llama
    "qwen2": lambda: split_then_bytes(QWEN2_SPLIT),  # Qwen2, Qwen2.5
}
IGNORE_MERGES = {"llama-bpe"}  # a piece that is itself a vocabulary token is taken whole (Llama 3)
ADD_BOS_DEFAULT = {"llama-bpe"}  # llama.cpp prepends BOS for these when the file does not say


def gguf_tokenizer(fields: dict) -> Tokenizer:
    """The byte-level BPE tokenizer ('gpt2' model) stored in a GGUF file's metadata `fields`.

    Pre-tokenizer by `tokenizer.ggml.pre` (see PRE_TOKENIZERS; none = 'gpt2'), control tokens
    (type 3) as special tokens and user-defined ones (type 4) as added tokens, BOS/EOS
    prepended/appended by `encode` (unless add_special_tokens=False) when the file's
    `add_bos_token`/`add_eos_token` say so. Raises CheckpointError for anything else.
    """
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"GGUF tokenizer {fields.get('tokenizer.ggml.model')!r} is not supported, "
                              "only byte-level BPE ('gpt2'): use a Hugging Face directory of this model")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)}): "
                              "use a Hugging Face directory of this model")
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in fields.get("tokenizer.ggml.merges", [])]
    for i, merge in enumerate(merges):  # the BPE model would fail on it with a long Rust message
        if len(merge) != 2 or merge[0] not in vocab or merge[1] not in vocab or "".join(merge) not in vocab:
            raise CheckpointError(f"GGUF merge {i} {' '.join(merge)!r} is not two vocabulary tokens joined into "
                                  "a third: re-convert the file")
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    kinds = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)  # control: <|im_end|>, <|eot_id|>
                                  for t, k in zip(tokens, kinds) if k == 3])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)  # user-defined: matched whole
                          for t, k in zip(tokens, kinds) if k == 4])

    single, specials = ["$A"], []
    for end in ("bos", "eos"):
        if adds(fields, end):
            token_id = fields.get(f"tokenizer.ggml.{end}_token_id")
            if token_id is None or not 0 <= token_id < len(tokens):
                raise CheckpointError(f"GGUF says add_{end}_token but has no valid {end}_token_id: re-convert the file")
            single.insert(0 if end == "bos" else len(single), tokens[token_id])
            specials.append((tokens[token_id], token_id))
    if specials:
        tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)
    return tokenizer


def adds(fields: dict, end: str) -> bool:
    """Whether a GGUF tokenizer prepends BOS (end="bos") or appends EOS ("eos") to plain text:
    as the file says, else llama.cpp's default (BOS for llama-bpe, if the file has one)."""
    has_id = f"tokenizer.ggml.{end}_token_id" in fields
    default = end == "bos" and has_id and fields.get("tokenizer.ggml.pre") in ADD_BOS_DEFAULT
    return bool(fields.get(f"tokenizer.ggml.add_{end}_token", default))


def read_gguf_fields(path: Path) -> dict:
    """The metadata of a GGUF file, {key: value}."""
    from gguf import GGUFReader

    try:
        return {name: field.contents() for name, field in GGUFReader(path).fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}): re-download it") from None


# ---------------------------------------------------------------------------------------
# Chat format

# The fallback for a tokenizer that has ChatML's tokens but no template of its own
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class ChatFormat:
    """How a checkpoint wants a conversation written, and which tokens end its answer.

    template: jinja2 chat template (the checkpoint's own, else ChatML when the tokenizer has
    its tokens, else None: plain completion only); bos_token/eos_token: the strings a template
    sees as `bos_token`/`eos_token`; stop_ids: EOS and end-of-turn token ids, for
    `generate(..., stop_tokens=...)`; add_bos: whether the tokenizer prepends BOS to plain text
    (a template writes its own, so encode a rendered prompt with add_special_tokens=False).
    """
    template: str | None
    bos_token: str | None = None
    eos_token: str | None = None
    stop_ids: tuple[int, ...] = ()
    add_bos: bool = False
    source: str = "the checkpoint"  # named in errors

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]), as
        transformers' `apply_chat_template(messages, tokenize=False, ...)` writes it."""
        if self.template is None:
            raise CheckpointError(f"{self.source} has no chat template (and no ChatML tokens): use --no-chat")
        specials = {name: token for name, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
                    if token is not None}
        try:
            n_content = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
            return bounded_render(compile_template(self.template), n_content, messages=messages, tools=None,
                                  documents=None, add_generation_prompt=add_generation_prompt, **specials)
        except Exception as e:  # untrusted code: any failure (syntax, sandbox, the template's own) is the checkpoint's
            reason = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"the chat template of {self.source} failed ({type(e).__name__}: {reason}): "
                                  "pass --no-chat, or fix chat_template in the checkpoint") from None

    def encode(self, tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> "Encoded":
        """`render(messages)` as ids: the template's own special tokens become their ids, and
        what the messages say stays text, even where it spells a special token, so a user cannot
        end their turn or write a system turn (llama.cpp's parse_special=false for user text;
        transformers parses it, huggingface/transformers#29279)."""
        hidden = Hidden(tokenizer)
        return hidden.encode(self.render(hidden.messages(messages), add_generation_prompt))

    def turn_ids(self, tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
        """The ids that carry a cached conversation to its new user turn `messages[-1]`: what the
        template writes between the last reply `messages[-2]` and the new generation prompt. Earlier
        turns stay as the cache holds them (as generated), where the template would now rewrite
        them (drop a <think> block, trim a reply, move a system prompt)."""
        if len(messages) < 3 or messages[-2]["role"] != "assistant":
            raise PromptError("turn_ids needs a conversation that ends in a reply and a new user message")
        hidden = Hidden(tokenizer)
        *history, _, new = hidden.messages(messages)
        rendered = self.render([*history, {"role": "assistant", "content": REPLY}, new])
        if REPLY not in rendered:
            raise CheckpointError(f"the chat template of {self.source} does not write the last reply, so a cached "
                                  "conversation cannot go on turn by turn: pass --no-chat")
        return hidden.encode(rendered[rendered.rindex(REPLY) + 1:]).ids

    def split(self, tokenizer: Tokenizer, context: str, questions: list[str]) -> tuple["Encoded", list[list[int]]]:
        """(the context, each question's ids) of one user turn holding the context, a blank line
        and then the question: context + question ids are exactly `encode` of that turn (see
        `shared_prefix`)."""
        prompts = []
        for question in questions:
            hidden = Hidden(tokenizer)
            content = f"{hidden.hide(context)}\n\n{CUT}{hidden.hide(question)}"
            left, right = self.render([{"role": "user", "content": content}]).split(CUT)
            prompts.append((hidden.encode(left + right), len(hidden.restore(left))))
        return shared_prefix(prompts)

    def hf_files(self) -> dict[str, str]:
        """tokenizer_config.json and generation_config.json that carry this format in a
        Hugging Face directory (read back by `chat_format`)."""
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, for any version
                            "add_bos_token": self.add_bos, "bos_token": self.bos_token, "eos_token": self.eos_token,
                            "chat_template": self.template}
        return {"tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
                "generation_config.json": json.dumps({"eos_token_id": list(self.stop_ids)}, indent=2)}


# Unicode noncharacters, never in real text, that a template passes through untouched: a hidden
# piece of a message (HIDE index UNHIDE), the seam between a context and its question, the last reply
HIDE, UNHIDE, CUT, REPLY = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
HIDDEN = re.compile(f"{HIDE}(\\d+){UNHIDE}")


class Hidden:
    """Message text kept text through a chat template: each special token's string in it (and each
    mark character) is replaced by a placeholder before rendering and put back after, so the only
    special tokens in the rendered prompt are the template's own."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.pieces = tokenizer, []
        self.specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        longest_first = sorted(self.specials, key=len, reverse=True)
        self.special = re.compile(f"({'|'.join(map(re.escape, longest_first))})") if self.specials else None
        self.unsafe = re.compile("|".join([*map(re.escape, longest_first), "[\ufdd0-\ufdd3]"]))

    def hide(self, text: str) -> str:
        return self.unsafe.sub(self.placeholder, text)  # encode_text checks what reaches the tokenizer

    def placeholder(self, match: re.Match) -> str:
        self.pieces.append(match.group())
        return f"{HIDE}{len(self.pieces) - 1}{UNHIDE}"

    def messages(self, messages: list[dict]) -> list[dict]:
        return [{**m, "content": self.hide(m["content"])} if isinstance(m.get("content"), str) else m
                for m in messages]

    def restore(self, text: str) -> str:
        return HIDDEN.sub(lambda m: self.pieces[int(m[1])] if int(m[1]) < len(self.pieces) else m[0], text)

    def encode(self, rendered: str) -> "Encoded":
        """A rendered prompt as ids: the special tokens it spells are the template's, the rest
        (hidden pieces restored) is text."""
        encoded = Encoded([], [], "")
        for i, piece in enumerate(self.special.split(rendered) if self.special else [rendered]):  # text, special, text, ...
            encoded += (Encoded([self.specials[piece]], [len(piece)], piece) if i % 2 else
                        encode_text(self.tokenizer, self.restore(piece)))
        return encoded


@dataclass
class Encoded:
    """Token ids of a text, and where each token ends in it (characters)."""
    ids: list[int]
    ends: list[int]
    text: str

    def __add__(self, other: "Encoded") -> "Encoded":
        return Encoded(self.ids + other.ids, self.ends + [len(self.text) + end for end in other.ends],
                       self.text + other.text)


def encode_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool = False) -> Encoded:
    """`text` as text: a special token's string in it stays characters (user text), though the
    tokenizer adds its BOS/EOS with `add_special_tokens`. Raises PromptError for text that is not
    valid Unicode (a lone surrogate)."""
    check_text(text)
    parses = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # "encode them as text", despite the name
    try:
        encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.encode_special_tokens = parses
    return Encoded(encoding.ids, [end for _, end in encoding.offsets], text)


def split_text(tokenizer: Tokenizer, context: str, questions: list[str],
               add_special_tokens: bool) -> tuple[Encoded, list[list[int]]]:
    """`ChatFormat.split` without a template: each prompt is the context, then the question."""
    return shared_prefix([(encode_text(tokenizer, context + question, add_special_tokens), len(context))
                          for question in questions])


REPEAT_FIRST = "Repeat the previous context exactly."  # KVzip's repeat prompts (the blank line before them
REPEAT_LATER = "Repeat the part of the previous context exactly, starting with"  # is the question's own)


def repeat_prompts(tokenizer: Tokenizer, asks: list[list[int]], chat) -> tuple[list[int], list[int], list[int]]:
    """KVzip's repeat prompts (contexts.Repeat's first, later, suffix) from `asks`, the ids of REPEAT_FIRST and
    REPEAT_LATER written as questions after the context: the suffix is the `chat` template's turn to the
    assistant that both end with; "\n" without a template."""
    first, later = asks
    if chat is None:
        return first, later, encode_text(tokenizer, "\n").ids
    n = max(n for n in range(min(len(first), len(later)) + 1) if first[len(first) - n:] == later[len(later) - n:])
    return first[:len(first) - n], later[:len(later) - n], first[len(first) - n:]


def shared_prefix(prompts: list[tuple[Encoded, int]]) -> tuple[Encoded, list[list[int]]]:
    """(the context, each question's ids) from each whole prompt and where its question starts:
    the context is the tokens every prompt shares that end by then, so context + question ids
    are exactly the prompt's (tokenized apart, "\n\n" + "Who" gives 'ĊĊ' where it has 'Ċ', 'Ċ')."""
    first, n = prompts[0][0], 0
    while all(n < len(p.ids) and p.ends[n] <= cut and p.ids[n] == first.ids[n] for p, cut in prompts):
        n += 1
    context = Encoded(first.ids[:n], first.ends[:n], first.text[:first.ends[n - 1] if n else 0])
    return context, [p.ids[n:] for p, _ in prompts]


def check_text(text: str, what: str = "the text") -> str:
    """`text`, or a PromptError when it holds lone surrogates (what Python makes of bytes that are
    not UTF-8 in argv or a C-locale stdin, and of a JSON "\\ud800": the tokenizer would raise a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid UTF-8 text (a lone surrogate at character {e.start}): "
                          "pass UTF-8 text") from None
    return text


def chat_format(path: str | Path) -> ChatFormat:
    """The chat format of a checkpoint: a Hugging Face directory or a .gguf file.

    Template from chat_template.jinja, else tokenizer_config.json's `chat_template` (GGUF:
    `tokenizer.chat_template`); BOS/EOS from tokenizer_config.json, else special_tokens_map.json;
    stop ids from generation_config.json's and config.json's `eos_token_id` and the tokenizer's
    EOS (GGUF: `eos`, `eot` and `eom_token_id`), plus the END_OF_TURN tokens the vocabulary has,
    as llama.cpp stops. Raises CheckpointError for unreadable files.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_chat_format(read_gguf_fields(path), str(path))
    if path.is_dir():
        return hf_chat_format(path)
    raise CheckpointError(f"checkpoint {path} is neither a directory nor a .gguf file")


def gguf_chat_format(fields: dict, source: str = "the GGUF file") -> ChatFormat:
    if "tokenizer.ggml.tokens" not in fields:
        raise CheckpointError(f"{source} has no tokenizer.ggml.tokens: re-convert it with its tokenizer")
    tokens = fields["tokenizer.ggml.tokens"]
    token = lambda key: tokens[fields[key]] if 0 <= fields.get(key, -1) < len(tokens) else None  # noqa: E731
    stop_ids = [fields[f"tokenizer.ggml.{kind}_token_id"] for kind in ("eos", "eot", "eom")
                if f"tokenizer.ggml.{kind}_token_id" in fields]
    vocab = {token: i for i, token in enumerate(tokens) if token in (*END_OF_TURN, "<|im_start|>")}
    return with_fallback(fields.get("tokenizer.chat_template"), token("tokenizer.ggml.bos_token_id"),
                         token("tokenizer.ggml.eos_token_id"), stop_ids, adds(fields, "bos"), source, vocab)


def hf_chat_format(path: Path) -> ChatFormat:
    config, generation, tokenizer_config = (read_json(path / name) for name in
                                            ("config.json", "generation_config.json", "tokenizer_config.json"))
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if (path / "chat_template.jinja").is_file():
        template = read_text(path / "chat_template.jinja")
    special_map = read_json(path / "special_tokens_map.json")  # where older checkpoints name BOS/EOS
    bos, eos = (special_content(tokenizer_config.get(name, special_map.get(name)))
                for name in ("bos_token", "eos_token"))
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise CheckpointError(f"{path}/tokenizer.json is unreadable ({e}): re-create the checkpoint") from None
    stop_ids = [*token_ids(generation, path / "generation_config.json"), *token_ids(config, path / "config.json"),
                *([tokenizer.token_to_id(eos)] if eos and tokenizer.token_to_id(eos) is not None else [])]
    vocab = {token: i for token in (*END_OF_TURN, "<|im_start|>") if (i := tokenizer.token_to_id(token)) is not None}
    add_bos = bos is not None and tokenizer.encode("").ids[:1] == [tokenizer.token_to_id(bos)]  # tokenizer.json decides
    return with_fallback(template, bos, eos, stop_ids, add_bos, str(path), vocab)


# Tokens that end a turn, by their text: llama.cpp's end-of-generation list (src/llama-vocab.cpp),
# so a file whose EOS is <|endoftext|> still stops at its template's <|im_end|>
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
               "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>")


def with_fallback(template, bos, eos, stop_ids, add_bos, source, vocab: dict[str, int]) -> ChatFormat:
    """The ChatFormat, ChatML its template where it has none but the tokenizer has ChatML's
    tokens; `vocab` maps the END_OF_TURN and ChatML tokens the tokenizer has to their ids."""
    if template is None and {"<|im_start|>", "<|im_end|>"} <= vocab.keys():
        template = CHATML
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: chat_template is a {type(template).__name__}, not a string: fix the checkpoint")
    stop_ids = [*stop_ids, *(i for token, i in vocab.items() if token in END_OF_TURN)]
    return ChatFormat(template, bos, eos, tuple(dict.fromkeys(stop_ids)), add_bos, source)


def read_json(path: Path) -> dict:
    """A JSON object file, {} when absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): fix or re-create it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a JSON object: fix or re-create it")
    return data


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as UTF-8 text ({e}): fix or re-create it") from None


def special_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def token_ids(config: dict, source: Path) -> list[int]:
    """`eos_token_id` of a config: an id, a list of ids, or absent."""
    ids = config.get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{source}: eos_token_id {config.get('eos_token_id')!r} is not a token id or a list of them")
    return ids
