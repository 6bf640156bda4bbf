"""Tests of tokenizer.py: GGUF tokenizers per `tokenizer.ggml.pre` and chat formats from
checkpoints. Oracles: transformers' own GGUF tokenizer and `apply_chat_template`, and a
plain-Python tokenizer written from llama.cpp's split rules (src/llama-vocab.cpp)."""
import json
import subprocess
from pathlib import Path

import gguf
import pytest
import regex
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import checkpoint
import registry
from conftest import cli as run_cli
from model import ModelArgs, Transformer
from tokenizer import CheckpointError, chat_format, gguf_tokenizer, read_gguf_fields


# ---------------------------------------------------------------------------------------
# A small byte-level BPE vocabulary, trained here, written into GGUF files

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>"]  # token type 3
USER_DEFINED = ["<think>", "</think>"]  # token type 4
CORPUS = ["The year 2024 had 365 days; 12345 and 3.14159 are numbers, so is 1000000 and 123 456 789.",
          "I'm sure they'll say it's fine, don't you think? We've done what we'd planned. I'M LOUD, DON'T.",
          "日本語のテキストです。中文也可以。한국어도 됩니다. 🙂🎉 emoji too! café naïve Ünïcödé",
          "    indented code\n\tline\n\n\nx = 1000000  # comment\r\n  y = x * 2\n",
          "12345/2024 (123) [2024] 12345-12345 #123 pi=3.14159"] * 50
TEXTS = ["12345", "3.14159", "The year 2024 had 365 days", "1234567 x 89", "a  b   c\t\td", "   leading",
         "trailing   ", " \n \n", "line\n\n\nnext\r\n", "日本語のテキスト", "中文 也可以。", "🙂🎉 ok", "👨‍👩‍👧 family",
         "I'm sure they'll say it's fine, don't you?", "I'M LOUD, DON'T", "café naïve Ünïcödé",
         "<|im_start|>user\nhi 42<|im_end|>\n", "x<|endoftext|>y", "<think>hmm</think> 99 bottles", ""]


@pytest.fixture(scope="module")
def vocab() -> tuple[list[str], list[str]]:
    """(tokens, merges) of a BPE trained on CORPUS, digits merged into runs ('123', '2024')."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=CONTROL + USER_DEFINED, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert {"123", "2024", "Ġ365"} <= set(tokens)  # else the digit tests would prove nothing
    return tokens, [" ".join(merge) for merge in model["merges"]]


def write_gguf(path: Path, vocab, pre: str | None, control=CONTROL, **fields) -> Path:
    """A tokenizer-only GGUF file; `fields` are extra metadata, e.g. add_bos_token=True."""
    tokens, merges = vocab
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in control else 4 if t in USER_DEFINED else 1 for t in tokens])
    writer.add_token_merges(merges)
    for key, value in fields.items():
        key = key if key.startswith("tokenizer.") else f"tokenizer.ggml.{key}"
        {bool: writer.add_bool, int: writer.add_uint32, str: writer.add_string}[type(value)](key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------------------------------
# The plain-Python reference: llama.cpp's split rules, then textbook BPE

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA_CPP_SPLITS = {  # llama.cpp's regex_exprs: each splits every piece further, gaps kept
    "gpt2": [GPT2],
    "smollm": [r"\p{N}", GPT2],
    "llama-bpe": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(extra)) for b in range(256)]


def split_keeping_gaps(pattern: str, text: str) -> list[str]:
    pieces, start = [], 0
    for match in regex.finditer(pattern, text):
        pieces += [text[start:match.start()], match.group()]
        start = match.end()
    return [piece for piece in pieces + [text[start:]] if piece]


def bpe(word: str, ranks: dict) -> list[str]:
    """Merge the adjacent pair of lowest rank until none is left (GPT-2's encoder.py)."""
    parts = list(word)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_ids(text: str, fields: dict) -> list[int]:
    tokens = fields["tokenizer.ggml.tokens"]
    ids = {token: i for i, token in enumerate(tokens)}
    ranks = {tuple(merge.split(" ")): rank for rank, merge in enumerate(fields["tokenizer.ggml.merges"])}
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    added = [t for t, kind in zip(tokens, fields["tokenizer.ggml.token_type"]) if kind in (3, 4)]
    chars = byte_chars()
    out = []
    if fields.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe" and "tokenizer.ggml.bos_token_id" in fields):
        out.append(fields["tokenizer.ggml.bos_token_id"])
    for piece in regex.split("(" + "|".join(map(regex.escape, added)) + ")", text):
        if piece in added:
            out.append(ids[piece])
            continue
        words = [piece]
        for pattern in LLAMA_CPP_SPLITS[pre]:
            words = [part for word in words for part in split_keeping_gaps(pattern, word)]
        for word in words:
            mapped = "".join(chars[b] for b in word.encode("utf-8"))
            whole = pre == "llama-bpe" and mapped in ids  # llama.cpp's ignore_merges
            out += [ids[mapped]] if whole else [ids[part] for part in bpe(mapped, ranks)]
    return out


# ---------------------------------------------------------------------------------------
# GGUF tokenizers

@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", None])
def test_gguf_tokenizer_matches_llama_cpp_rules(tmp_path, vocab, pre):
    fields = read_gguf_fields(write_gguf(tmp_path / "t.gguf", vocab, pre, bos_token_id=3))
    tokenizer = gguf_tokenizer(fields)
    for text in TEXTS:
        assert tokenizer.encode(text).ids == reference_ids(text, fields), text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False).removeprefix(
            "<|begin_of_text|>") == text


def test_digits_split_per_pre_tokenizer(tmp_path, vocab):
    pieces = {}
    for pre in ("llama-bpe", "qwen2", "smollm"):
        tokenizer = gguf_tokenizer(read_gguf_fields(write_gguf(tmp_path / f"{pre}.gguf", vocab, pre)))
        pieces[pre] = tokenizer.encode("12345", add_special_tokens=False).tokens
    assert pieces == {"llama-bpe": ["123", "45"], "qwen2": ["1", "2", "3", "4", "5"],
                      "smollm": ["1", "2", "3", "4", "5"]}


@pytest.mark.parametrize("pre, add_bos", [("llama-bpe", True), ("llama-bpe", False), ("qwen2", None),
                                          ("qwen2", True), (None, None)])
def test_gguf_tokenizer_matches_transformers(tmp_path, vocab, pre, add_bos):
    """transformers has no SmolLM2 split (it falls back to GPT-2's, digits in runs): smollm is
    checked against llama.cpp's rules above and on the real vocabulary below."""
    extra = {} if add_bos is None else {"add_bos_token": add_bos}
    path = write_gguf(tmp_path / "t.gguf", vocab, pre, bos_token_id=3, eos_token_id=4, **extra)
    ours, theirs = gguf_tokenizer(read_gguf_fields(path)), transformers_gguf_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False)["input_ids"]


def test_llama_bpe_adds_bos_unless_the_file_says_not(tmp_path, vocab):
    """Where a Llama 3 file is silent, llama.cpp prepends BOS (as Meta's tokenizer does);
    transformers does not. chunkkv follows llama.cpp."""
    silent = gguf_tokenizer(read_gguf_fields(write_gguf(tmp_path / "t.gguf", vocab, "llama-bpe", bos_token_id=3)))
    assert silent.encode("hi").ids[0] == 3
    assert silent.encode("hi", add_special_tokens=False).ids[0] != 3


def test_llama_bpe_takes_a_vocabulary_word_whole(tmp_path, vocab):
    """Llama 3's tokenizer (and llama.cpp) take a piece found in the vocabulary whole, even
    where the merges would not build it (ignore_merges); the other splits use the merges."""
    tokens, merges = vocab
    extended = (tokens + ["Ġzqx"], merges)
    for pre, expected in (("llama-bpe", ["Ġzqx"]), ("qwen2", ["Ġ", "z", "q", "x"])):
        fields = read_gguf_fields(write_gguf(tmp_path / f"{pre}.gguf", extended, pre, add_bos_token=False))
        assert gguf_tokenizer(fields).encode(" zqx").tokens == expected
        assert reference_ids(" zqx", fields) == gguf_tokenizer(fields).encode(" zqx").ids


def test_control_tokens_outside_the_byte_alphabet_stay_whole(tmp_path, vocab):
    """DeepSeek-R1-Distill-Llama's control tokens are spelled outside GPT-2's byte alphabet;
    llama.cpp (and DeepSeek's own tokenizer.json) match them whole in text."""
    tokens, merges = vocab
    eos = "<｜end▁of▁sentence｜>"
    path = write_gguf(tmp_path / "t.gguf", (tokens + [eos], merges), "llama-bpe", [*CONTROL, eos], add_bos_token=False)
    fields = read_gguf_fields(path)
    ids = gguf_tokenizer(fields).encode(f"Done 12345.{eos}").ids
    assert ids[-1] == len(tokens) and ids == reference_ids(f"Done 12345.{eos}", fields)


def test_unsupported_gguf_tokenizers_are_refused(tmp_path, vocab):
    fields = read_gguf_fields(write_gguf(tmp_path / "t.gguf", vocab, "deepseek-llm"))
    with pytest.raises(CheckpointError, match=r"pre-tokenizer 'deepseek-llm' is not supported \(supported: "
                                              r"gpt2, smollm, llama-bpe, qwen2\)") as error:
        gguf_tokenizer(fields)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="GGUF tokenizer 'llama' is not supported"):
        gguf_tokenizer({**fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(CheckpointError, match="add_bos_token but has no valid bos_token_id"):
        gguf_tokenizer({**fields, "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": True})


@pytest.mark.model
def test_default_model_tokenizer_matches_llama_cpp_rules():
    """SmolLM2's real 49,152-token vocabulary, split by llama.cpp's 'smollm' rules."""
    tokenizer = Tokenizer.from_file(str(registry.resolve(None) / "tokenizer.json"))
    model = json.loads(tokenizer.to_str())
    added = {token["content"] for token in model["added_tokens"]}
    tokens = sorted(model["model"]["vocab"], key=model["model"]["vocab"].get)
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.pre": "smollm",
              "tokenizer.ggml.merges": [" ".join(merge) for merge in model["model"]["merges"]],
              "tokenizer.ggml.token_type": [3 if token in added else 1 for token in tokens]}
    ours = gguf_tokenizer(fields)
    for text in TEXTS:
        assert ours.encode(text).ids == reference_ids(text, fields) == tokenizer.encode(text).ids, text


# ---------------------------------------------------------------------------------------
# Chat formats

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # from its GGUF
QWEN_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3_STYLE = """{{- bos_token }}
{%- set today = strftime_now("%d %b %Y") %}
{%- if tools is not none %}
    {{- 'Tools: ' + tools | tojson }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if loop.first and message.role == 'system' %}
        {{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + today + '\\n\\n' }}
        {{- message.content | trim + '<|eot_id|>' }}
        {%- continue %}
    {%- endif %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
BLOCKS_AND_JSON = """{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    <turn>{{ message | tojson(indent=2, sort_keys=True) }}</turn>
{% endfor %}
{% if add_generation_prompt %}
    <turn>{{ {'role': 'assistant'} | tojson }}
{% endif %}
"""  # trim_blocks / lstrip_blocks, loopcontrols and transformers' tojson (no HTML escaping)
TEMPLATES = {"smollm2": SMOLLM2, "qwen": QWEN_STYLE, "llama3": LLAMA3_STYLE, "json": BLOCKS_AND_JSON}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  café, 日本, 🙂 & <b>\"x\"</b>  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "12345?"}],
]


def hf_tokenizer_dir(path: Path, vocab, tokenizer_config: dict, files: dict | None = None) -> Path:
    path.mkdir()
    gguf_tokenizer(read_gguf_fields(write_gguf(path.parent / f"{path.name}.gguf", vocab, "qwen2"))).save(
        str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def expected_prompts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in CONVERSATIONS]


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_template_from_hf_directory_matches_transformers(tmp_path, vocab, name):
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}}
    in_config = hf_tokenizer_dir(tmp_path / "config", vocab, {**specials, "chat_template": TEMPLATES[name]})
    in_file = hf_tokenizer_dir(tmp_path / "file", vocab, {**specials, "chat_template": "not this one"},
                               {"chat_template.jinja": TEMPLATES[name]})  # the file wins, as in transformers
    for path in (in_config, in_file):
        expected = expected_prompts(transformers.AutoTokenizer.from_pretrained(str(path)))
        assert [chat_format(path).render(messages) for messages in CONVERSATIONS] == expected


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_template_from_gguf_matches_transformers(tmp_path, vocab, name):
    path = write_gguf(tmp_path / "t.gguf", vocab, "llama-bpe", bos_token_id=3, eos_token_id=4,
                      **{"tokenizer.chat_template": TEMPLATES[name]})
    expected = expected_prompts(transformers_gguf_tokenizer(path))
    assert [chat_format(path).render(messages) for messages in CONVERSATIONS] == expected


def tiny_config(vocab_size: int) -> dict:
    return {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": vocab_size, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512, "tie_word_embeddings": True}


def hf_names(model: Transformer) -> dict:
    return {f"model.{name}": w for name, w in model.state_dict().items() if name != "lm_head.weight"}  # tied


def converted(tmp_path: Path, vocab, template: str | None, name: str = "dir") -> tuple[Path, Path]:
    """A GGUF tokenizer with `template`, and the checkpoint directory that the default model's
    conversion writes from such a file (a tiny random model)."""
    extra = {} if template is None else {"tokenizer.chat_template": template}
    path = write_gguf(tmp_path / f"{name}.gguf", vocab, "llama-bpe", bos_token_id=3, eos_token_id=4, eot_token_id=2,
                      add_bos_token=True, **extra)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=len(vocab[0])))
    checkpoint.write_checkpoint(tmp_path / name, tiny_config(len(vocab[0])), hf_names(model),
                                gguf_tokenizer(read_gguf_fields(path)), chat_format(path).hf_files())
    return path, tmp_path / name


def test_converted_gguf_keeps_its_chat_format(tmp_path, vocab):
    """The default model's conversion writes tokenizer_config.json and generation_config.json,
    so the directory renders and stops exactly as the GGUF file did."""
    path, directory = converted(tmp_path, vocab, LLAMA3_STYLE)
    from_gguf, from_dir = chat_format(path), chat_format(directory)
    assert (from_dir.template, from_dir.bos_token, from_dir.eos_token, from_dir.stop_ids, from_dir.add_bos) == (
        from_gguf.template, from_gguf.bos_token, from_gguf.eos_token, from_gguf.stop_ids, from_gguf.add_bos)
    assert from_gguf.stop_ids == (4, 2)
    expected = expected_prompts(transformers.AutoTokenizer.from_pretrained(str(directory)))
    assert [from_dir.render(messages) for messages in CONVERSATIONS] == expected
    assert transformers.GenerationConfig.from_pretrained(str(directory)).eos_token_id == [4, 2]


def test_stop_ids_from_each_source(tmp_path, vocab):
    path = hf_tokenizer_dir(tmp_path / "hf", vocab, {"eos_token": "<|endoftext|>"}, {
        "generation_config.json": json.dumps({"eos_token_id": [4, 2]}), "config.json": json.dumps({"eos_token_id": 2})})
    assert chat_format(path).stop_ids == (4, 2, 0)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    assert chat_format(path).stop_ids == (3, 2, 0)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(CheckpointError, match="eos_token_id 'two' is not a token id"):
        chat_format(path)
    gguf_path = write_gguf(tmp_path / "t.gguf", vocab, "qwen2", eos_token_id=0, eot_token_id=4, eom_token_id=3,
                           **{"tokenizer.chat_template": LLAMA3_STYLE})
    assert chat_format(gguf_path).stop_ids == (0, 4, 3)


def test_chatml_is_only_the_fallback(tmp_path, vocab):
    """No template: ChatML when the tokenizer has its tokens (stopping at <|im_end|>), else none."""
    gguf_path = write_gguf(tmp_path / "t.gguf", vocab, "qwen2", eos_token_id=0)
    fallback = chat_format(gguf_path)
    assert fallback.render(CONVERSATIONS[0]) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert fallback.stop_ids == (0, 2)
    tokens, merges = vocab
    no_chatml = ([t if t != "<|im_start|>" else "<|start|>" for t in tokens], merges)
    plain = chat_format(write_gguf(tmp_path / "plain.gguf", no_chatml, "qwen2"))
    assert plain.template is None and plain.stop_ids == ()
    with pytest.raises(CheckpointError, match="has no chat template"):
        plain.render(CONVERSATIONS[0])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% set _ = messages.pop() %}{{ messages | length }}",
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ (messages | attr('__class__')).__mro__ }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch PWNED') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% for m in messages %}{{ m.content.format.__self__.__class__ }}{% endfor %}",
])
def test_malicious_templates_fail_in_one_line(tmp_path, vocab, monkeypatch, template):
    monkeypatch.chdir(tmp_path)
    path = write_gguf(tmp_path / "evil.gguf", vocab, "qwen2", **{"tokenizer.chat_template": template})
    with pytest.raises(CheckpointError) as error:
        chat_format(path).render(CONVERSATIONS[0])
    message = str(error.value)
    assert "\n" not in message and "evil.gguf" in message and "chat template" in message, message
    assert not (tmp_path / "PWNED").exists()


def test_template_errors_are_one_line(tmp_path, vocab):
    for template, reason in (("{% for %}", "TemplateSyntaxError"), ("{{ messages[5].content }}", "UndefinedError"),
                             ("{{ raise_exception('no tools here') }}", "no tools here")):
        path = hf_tokenizer_dir(tmp_path / str(len(reason)), vocab, {"chat_template": template})
        with pytest.raises(CheckpointError, match=reason) as error:
            chat_format(path).render(CONVERSATIONS[0])
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        chat_format(path)


# ---------------------------------------------------------------------------------------
# The command line uses the checkpoint's template, BOS and stop ids

def cli(*args) -> subprocess.CompletedProcess:
    return run_cli("--method", "full", "--max-new-tokens", "2", *args)


def test_cli_uses_the_checkpoints_chat_format(tmp_path, vocab):
    _, directory = converted(tmp_path, vocab, LLAMA3_STYLE)
    tokenizer, chat = Tokenizer.from_file(str(directory / "tokenizer.json")), chat_format(directory)
    text = "What is 12345?"
    n_chat = len(tokenizer.encode(chat.render([{"role": "user", "content": text}]), add_special_tokens=False).ids)
    n_plain = len(tokenizer.encode(text).ids)  # BOS included
    assert n_plain == len(tokenizer.encode(text, add_special_tokens=False).ids) + 1
    for flag, expected in (("--chat", f"Prompt ({n_chat} tokens, chat template)"), ("--no-chat", f"Prompt ({n_plain} tokens)")):
        result = cli("--checkpoint", str(directory), "--prompt", text, flag)
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout, result.stdout


def test_cli_chat_errors_are_one_line(tmp_path, vocab):
    _, failing = converted(tmp_path, vocab, "{{ raise_exception('this template needs tools') }}", "failing")
    tokens, merges = vocab
    _, plain = converted(tmp_path, ([t if t != "<|im_start|>" else "<|start|>" for t in tokens], merges), None, "plain")
    for directory, reason in ((failing, "this template needs tools"), (plain, "has no chat template")):
        result = cli("--checkpoint", str(directory), "--prompt", "hi", "--chat")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert reason in lines[0] and str(directory) in lines[0]


@pytest.mark.model
def test_default_model_answers_through_its_own_template(tmp_path, monkeypatch):
    """A fresh conversion of the default GGUF carries SmolLM2's template and stop id."""
    from chunkkv import CompressionConfig
    from generate import generate

    monkeypatch.setenv("CHUNKKV_HOME", str(tmp_path))
    path = registry.resolve(None)
    model, tokenizer = checkpoint.load(path)
    chat = chat_format(path)
    assert chat.template == SMOLLM2 and chat.stop_ids == (2,) and not chat.add_bos
    prompt = chat.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
    new = generate(model, ids, CompressionConfig(method="full"), max_new_tokens=16, stop_tokens=chat.stop_ids).tokens
    assert "Paris" in tokenizer.decode(new[0].tolist())
