"""Compressed contexts saved to disk (contexts.py, --save-cache / --load-cache): a loaded cache answers
bit for bit as the one it was saved from, for every method; the file holds the kept entries and little
else; and a file that is missing, truncated, edited, forged or from another checkpoint, dtype or
tokenizer is refused in one line before any cache is touched."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

import contexts
from chunkkv import CompressionConfig
from cli import PASSKEY_QUESTION, passkey_prompt
from conftest import EVERY_METHOD, assert_user_error, byte_tokenizer, cli, greedy, tiny_model, write_tiny_dir
from generate import PromptError, answer, compress_context, load_context, save_context
from registry import load as load_checkpoint
from tokenizer import CheckpointError

torch.set_grad_enabled(False)


def compressed(model, label="chunkkv", kwargs=None, rows=1, n_tokens=120, room=40, **config):
    """A context of `n_tokens` random ids compressed on `model`, leaving `room` slots."""
    kwargs = dict(method="chunkkv") if kwargs is None else kwargs
    budget = {} if label in ("full", "fastgen") or "keep" in config else dict(budget=30)
    config = CompressionConfig(window=8, recovery=0.5, **kwargs, **budget, **config)
    return compress_context(model, torch.randint(3, 256, (rows, n_tokens)), config, room)


def asked(model, context, question, n_steps=10):
    """The question's logits [B, Tq, vocab], then greedy tokens and their logits, from `context`."""
    model.restore(context.snapshot)
    logits = model.extend(question)
    return (logits, *greedy(model, logits[:, -1], n_steps))


# ---------------------------------------------------------------------------------------
# A loaded cache is the cache it was saved from

@pytest.mark.parametrize("label, kwargs", EVERY_METHOD)
def test_a_loaded_cache_answers_bit_for_bit_as_the_saved_one(label, kwargs, tmp_path):
    """Saved, then loaded into a fresh model (another process, as far as the caches know): the same
    kept positions, the same logits for the question and each greedy step, the same answer."""
    model, tokenizer = tiny_model(n_layers=3), byte_tokenizer()
    torch.manual_seed(1)
    context, question = compressed(model, label, kwargs, rows=2), torch.randint(3, 256, (2, 7))
    expected = asked(model, context, question)
    record = answer(model, context, question, max_new_tokens=10)
    kept = model.kept_positions([120, 120])
    save_context(tmp_path / "c.kv", model, tokenizer, context)
    fresh = tiny_model(n_layers=3)
    loaded = load_context(tmp_path / "c.kv", fresh, tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(fresh.kept_positions([120, 120]), kept))
    assert all(torch.equal(a, b) for a, b in zip(asked(fresh, loaded, question), expected))  # bit for bit
    assert torch.equal(answer(fresh, loaded, question, max_new_tokens=10).tokens, record.tokens)
    assert (loaded.n_tokens, loaded.free_slots, loaded.config) == (context.n_tokens, context.free_slots, context.config)
    assert loaded.prefill == context.prefill and torch.equal(loaded.tokens, context.tokens)
    assert [c.k.shape for c in fresh.caches()] == [c.k.shape for c in model.caches()]  # the free room, again


def test_a_saved_cache_keeps_what_compression_left_after_questions_were_asked(tmp_path):
    """Saving restores the snapshot first: questions answered before saving leave nothing in the file,
    and a loaded context answers question 2 after question 1 as question 2 alone."""
    model, tokenizer = tiny_model(), byte_tokenizer()
    context = compressed(model)
    q1, q2 = torch.randint(3, 256, (1, 9)), torch.randint(3, 256, (1, 5))
    alone = asked(model, context, q2)
    asked(model, context, q1)  # appended to the caches, and left there
    save_context(tmp_path / "c.kv", model, tokenizer, context)
    fresh = tiny_model()
    loaded = load_context(tmp_path / "c.kv", fresh, tokenizer)
    asked(fresh, loaded, q1)
    assert all(torch.equal(a, b) for a, b in zip(asked(fresh, loaded, q2), alone))
    compressed(model)  # the caches move on: the first context is gone
    with pytest.raises(PromptError, match="compress the context again"):
        save_context(tmp_path / "c.kv", model, tokenizer, context)


def test_the_file_is_the_kept_kv_and_little_more(tmp_path):
    """Within 5 % of the kept K/V bytes on a model with 64-dimensional heads at keep 0.25 (positions are
    int32 beside 512 bytes of K and V per entry and head); the free slots are not stored."""
    model, tokenizer = tiny_model(n_layers=4, dim=256), byte_tokenizer()  # 4 heads of 64, 2 KV heads
    sizes = []
    for room in (16, 400):
        context = compressed(model, n_tokens=512, room=room, keep=0.25)
        context.text = "x" * 512
        sizes.append(save_context(tmp_path / f"{room}.kv", model, tokenizer, context))
        assert sizes[-1] == (tmp_path / f"{room}.kv").stat().st_size
    kept_kv = sum(layer["k"].nbytes + layer["v"].nbytes for layer in contexts.kept_kv(model))
    assert kept_kv == 4 * 2 * 2 * 128 * 64 * 4  # layers, K and V, KV heads, kept entries, head dim, float32
    assert sizes[1] / kept_kv <= 1.05, sizes[1] / kept_kv
    assert abs(sizes[1] - sizes[0]) < 16  # 384 more free slots a layer: a few digits of metadata more


def test_a_context_saved_with_its_text_gives_it_back(tmp_path):
    model, tokenizer = tiny_model(), byte_tokenizer()
    context = compressed(model)
    context.text, context.chat = "ünïcode context\n", True
    save_context(tmp_path / "c.kv", model, tokenizer, context)
    loaded = load_context(tmp_path / "c.kv", tiny_model(), tokenizer)
    assert (loaded.text, loaded.chat) == ("ünïcode context\n", True)
    context.text = None
    save_context(tmp_path / "c.kv", model, tokenizer, context)
    assert load_context(tmp_path / "c.kv", tiny_model(), tokenizer).text is None


# ---------------------------------------------------------------------------------------
# Written atomically

@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_no_file_and_no_temporary_file(failure, tmp_path, monkeypatch):
    model, tokenizer = tiny_model(), byte_tokenizer()
    context = compressed(model)
    (tmp_path / "old.kv").write_bytes(b"the file saved before")

    def fail(fd):
        raise failure
    monkeypatch.setattr(contexts.os, "fsync", fail)  # after the bytes were written, before the rename
    for name in ("new.kv", "old.kv"):
        with pytest.raises(PromptError if isinstance(failure, OSError) else KeyboardInterrupt) as error:
            save_context(tmp_path / name, model, tokenizer, context)
        if isinstance(failure, OSError):
            assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.kv"]  # no new file, no temporary file
    assert (tmp_path / "old.kv").read_bytes() == b"the file saved before"  # the old one untouched


def test_a_cache_file_cannot_be_written_into_a_missing_folder(tmp_path):
    model = tiny_model()
    with pytest.raises(PromptError, match="cannot write cache file .*No such file or directory"):
        save_context(tmp_path / "missing" / "c.kv", model, byte_tokenizer(), compressed(model))
    with pytest.raises(PromptError, match="does not exist or is not writable"):
        contexts.check_writable(tmp_path / "missing" / "c.kv")
    with pytest.raises(PromptError, match="it is a folder"):
        contexts.check_writable(tmp_path)


# ---------------------------------------------------------------------------------------
# Refused in one line, before any cache is touched

@pytest.fixture
def saved(tmp_path):
    """(path, a fresh model that did not save it, the tokenizer) for a chunkkv context saved from tiny_model()."""
    model, tokenizer = tiny_model(), byte_tokenizer()
    context = compressed(model)
    context.text = "the context\n"
    save_context(tmp_path / "c.kv", model, tokenizer, context)
    fresh = tiny_model()
    compressed(fresh)  # caches a refused load must leave alone
    return tmp_path / "c.kv", fresh, tokenizer


def refused(path, model, tokenizer, error, *fragments):
    """load_context raises `error` with one line holding `fragments`, and the caches are untouched."""
    def state():
        tensors = lambda c: (c.k, c.v, c.pos, c.used)  # noqa: E731
        return [(c.fills, *(None if t is None else t.clone() for t in tensors(c))) for c in model.caches()]
    before = state()
    with pytest.raises(error) as raised:
        load_context(path, model, tokenizer)
    message = str(raised.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    for old, new in zip(before, state()):
        assert old[0] == new[0] and all(x is y is None or torch.equal(x, y) for x, y in zip(old[1:], new[1:]))
    return message


@pytest.mark.parametrize("cut", [4, 20, -1, -100, "header"])
def test_a_truncated_file_is_refused(cut, saved):
    path, model, tokenizer = saved
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:header - 10] if cut == "header" else data[:cut])
    refused(path, model, tokenizer, PromptError, "is truncated (" if cut != 4 else "is not a chunkkv cache")


@pytest.mark.parametrize("where", ["tensors", "last byte", "metadata"])
def test_an_edited_byte_is_refused(where, saved):
    path, model, tokenizer = saved
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    if where == "metadata":  # a digit of the stored free slots: still valid JSON of the right kinds
        start = data.index(b'slots\\": [') + len(b'slots\\": [')
        data[start] = ord("7") if data[start] != ord("7") else ord("6")
    else:
        data[header + 100 if where == "tensors" else -1] ^= 0x01
    path.write_bytes(bytes(data))
    refused(path, model, tokenizer, PromptError, "fails its checksum")


def test_a_cache_of_another_checkpoint_dtype_or_tokenizer_is_refused(saved):
    path, model, tokenizer = saved
    refused(path, tiny_model(seed=1), tokenizer, CheckpointError, "another checkpoint (its weights differ: other values or other --weights)")
    refused(path, tiny_model(n_layers=3), tokenizer, CheckpointError, "(its architecture differs)")
    refused(path, tiny_model(max_seq_len=512), tokenizer, CheckpointError, "(its architecture differs)")
    refused(path, tiny_model().to(torch.bfloat16), tokenizer, CheckpointError, "holds 'float32' K/V, the model runs "
            "in bfloat16")
    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_special_tokens(["<|end|>"])
    refused(path, model, other, CheckpointError, "(its tokenizer differs)")


def test_what_is_no_cache_file_is_refused(saved, tmp_path, tiny_dir):
    path, model, tokenizer = saved
    refused(tmp_path / "missing.kv", model, tokenizer, PromptError, "does not exist")
    (tmp_path / "text.kv").write_text("a text file, long enough to have eight bytes of header length")
    refused(tmp_path / "text.kv", model, tokenizer, PromptError, "not a chunkkv cache (no safetensors header)")
    refused(tiny_dir / "model.safetensors", model, tokenizer, PromptError, "without chunkkv's metadata")
    (tmp_path / "short.kv").write_bytes(b"\x02\x00")
    refused(tmp_path / "short.kv", model, tokenizer, PromptError, "not a chunkkv cache")
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    (tmp_path / "notjson.kv").write_bytes(data[:8] + b"{" * n + data[8 + n:])
    refused(tmp_path / "notjson.kv", model, tokenizer, PromptError, "its header is not JSON")
    refused(tmp_path, model, tokenizer, PromptError, "cannot read cache file", "Is a directory")
    os.mkfifo(tmp_path / "fifo.kv")
    refused(tmp_path / "fifo.kv", model, tokenizer, PromptError, "is not a file")  # and no wait for a writer
    (tmp_path / "locked.kv").write_bytes(path.read_bytes())
    (tmp_path / "locked.kv").chmod(0)
    if os.geteuid() != 0:  # root reads it anyway
        refused(tmp_path / "locked.kv", model, tokenizer, PromptError, "cannot read cache file", "Permission denied")


def forge(path: Path, meta=None, tensors=None):
    """Rewrite a saved file with its metadata and tensors edited and the checksum made to match: what
    someone who read contexts.py could write. The loader must not trust it further than its checks."""
    stored = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])["__metadata__"]
    fields, weights = json.loads(stored["chunkkv"]), load_file(path)
    (meta or (lambda f: None))(fields)
    (tensors or (lambda t: None))(weights)
    fields_json, weights = json.dumps(fields), {name: t.contiguous() for name, t in weights.items()}
    save_file(weights, path, {"chunkkv": fields_json, "sha256": contexts.digest(fields_json, weights)})


def test_a_forged_file_within_bounds_still_loads(saved):
    path, model, tokenizer = saved
    forge(path)
    assert load_context(path, model, tokenizer).text == "the context\n"


FORGERIES = {  # edit -> the refusal, each before any tensor reaches a cache
    "huge free room": (lambda m: m.update(slots=[2 ** 30] * 2), None, "asks for 1073741824 cache slots"),
    "free room past one context": (lambda m: m.update(slots=[n + 1032 for n in m["kept"]]), None, "cache slots"),
    "a context past the model's": (lambda m: m.update(n_tokens=5000), None, "more than the model's 1024"),
    "rows as a bool": (lambda m: m.update(rows=True), None, "holds rows True"),
    "tokens as text": (lambda m: m.update(n_tokens="120"), None, "holds n_tokens '120'"),
    "nan seconds": (lambda m: m.update(prefill_seconds=float("nan")), None, "holds prefill_seconds nan"),
    "an unknown field": (lambda m: m.update(extra=1), None, "does not write (extra)"),
    "a missing field": (lambda m: m.pop("chat"), None, "holds chat None"),
    "another format": (lambda m: m.update(format="chunkkv-context-0"), None, "not in the format"),
    "keep as text": (lambda m: m["config"].update(keep="0.1"), None, "setting keep '0.1'"),
    "an id past the vocabulary": (lambda m: m["config"].update(special_ids=[256]), None, "setting special_ids [256]"),
    "an unknown method": (lambda m: m["config"].update(method="magic"), None, "unknown method 'magic'"),
    "a setting too many": (lambda m: m["config"].update(magic=1), None, "settings chunkkv does not write"),
    "a fingerprint of numbers": (lambda m: m["fingerprint"].update(dtype=32), None, "fingerprint"),
    "a layer too many": (lambda m: m.update(kept=m["kept"] * 2, slots=m["slots"] * 2), None, "holds 4 layers"),
    "kept past the slots": (lambda m: m.update(kept=[s + 1 for s in m["slots"]]), None, "cache slots"),
    "a tensor's shape": (None, lambda t: t.update({"layers.0.k": t["layers.0.k"][:, :, :-1]}), "holds layers.0.k as"),
    "an extra tensor": (None, lambda t: t.update(extra=torch.zeros(1)), "does not list (['extra'])"),
    "used past the kept": (None, lambda t: t["layers.1.used"].add_(1), "counters or positions of layer 1"),
    "negative used": (None, lambda t: t["layers.0.used"].fill_(-5), "counters or positions of layer 0"),
    "a position past the context": (None, lambda t: t["layers.0.pos"].fill_(120), "counters or positions"),
    "a position below -1": (None, lambda t: t["layers.0.pos"][0, 0, 0].fill_(-2), "counters or positions"),
    "another length": (None, lambda t: t["layers.1.length"].add_(1), "counters or positions of layer 1"),
    "an id past the vocabulary ": (None, lambda t: t["tokens"].fill_(256), "outside the model's vocabulary"),
    "text that is not UTF-8": (None, lambda t: t["text"].fill_(0xFF), "not UTF-8"),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_file_out_of_bounds_is_refused(forgery, saved):
    path, model, tokenizer = saved
    meta, tensors, fragment = FORGERIES[forgery]
    forge(path, meta, tensors)
    refused(path, model, tokenizer, PromptError, fragment)


def test_a_header_past_its_bound_is_refused_unread(saved, monkeypatch):
    path, model, tokenizer = saved
    data = path.read_bytes()
    path.write_bytes((contexts.MAX_HEADER + 1).to_bytes(8, "little") + data[8:])
    refused(path, model, tokenizer, PromptError, "no safetensors header")


# ---------------------------------------------------------------------------------------
# The command line: save in one process, load and answer in another

def answers(stdout: str) -> list[str]:
    """The text of each answer a questions session printed."""
    return [part.split("\n", 1)[1].split("\n---\n")[0].rstrip("\n") for part in stdout.split("--- question ")[1:]]


CONTEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day in the old town of Ur.\n" * 2


def test_cli_save_then_load_in_other_processes_answers_as_one_process(tiny_dir, tmp_path):
    (tmp_path / "context.txt").write_text(CONTEXT)
    tiny = ("--checkpoint", str(tiny_dir), "--max-new-tokens", "8")
    questions = ("--question", "Who jumps?", "--question", "What day was it?")
    one = cli(*tiny, "--window", "8", "--context-file", str(tmp_path / "context.txt"), *questions)
    assert one.returncode == 0, one.stderr
    saving = cli(*tiny, "--window", "8", "--context-file", str(tmp_path / "context.txt"), "--save-cache",
                 str(tmp_path / "c.kv"), process=True)
    assert saving.returncode == 0, saving.stderr
    assert f"Saved the compressed context to {tmp_path / 'c.kv'}" in saving.stdout
    assert "--- question" not in saving.stdout
    loading = cli(*tiny, "--load-cache", str(tmp_path / "c.kv"), *questions, process=True)
    assert loading.returncode == 0, loading.stderr
    assert f"Loaded the context compressed in {tmp_path / 'c.kv'}" in loading.stdout
    assert len(answers(one.stdout)) == 2 and answers(loading.stdout) == answers(one.stdout)
    assert "KV kept per layer 17 of 174" in loading.stdout and "KV kept per layer 17 of 174" in one.stdout
    assert "in the run that saved" in loading.stdout and "2 questions answered from it" in loading.stdout


def chat_dir(tiny_dir: Path) -> Path:
    """The tiny checkpoint with a plain-text chat template (its tokenizer has no special tokens)."""
    template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return tiny_dir


def test_cli_a_chat_context_is_asked_in_its_chat_format(tiny_dir, tmp_path):
    checkpoint = str(chat_dir(tiny_dir))
    (tmp_path / "context.txt").write_text(CONTEXT)
    tiny = ("--checkpoint", checkpoint, "--max-new-tokens", "6")
    one = cli(*tiny, "--window", "8", "--context-file", str(tmp_path / "context.txt"), "--question", "Who?")
    assert one.returncode == 0 and ", chat template" in one.stdout, one.stderr
    saving = cli(*tiny, "--window", "8", "--context-file", str(tmp_path / "context.txt"), "--question", "Who?",
                 "--save-cache", str(tmp_path / "c.kv"))
    assert saving.returncode == 0 and answers(saving.stdout) == answers(one.stdout), saving.stderr
    loading = cli(*tiny, "--load-cache", str(tmp_path / "c.kv"), "--question", "Who?")
    assert loading.returncode == 0 and ", chat template" in loading.stdout, loading.stderr
    assert answers(loading.stdout) == answers(one.stdout)
    assert_user_error(cli(*tiny, "--load-cache", str(tmp_path / "c.kv"), "--question", "Who?", "--no-chat"),
                      "was compressed with the chat template: drop --no-chat")


def merging_dir(path: Path) -> Path:
    """A tiny checkpoint whose tokenizer merges "\\n\\n" into one token (id 255 instead of byte ÿ)."""
    write_tiny_dir(path)
    tokenizer = byte_tokenizer()
    vocab = {token: i for token, i in tokenizer.get_vocab().items() if i != 255} | {"ĊĊ": 255}
    merging = Tokenizer(models.BPE(vocab, [("Ċ", "Ċ")]))
    merging.pre_tokenizer, merging.decoder = tokenizer.pre_tokenizer, tokenizer.decoder
    merging.save(str(path / "tokenizer.json"))
    return path


def test_cli_a_question_that_joins_the_saved_contexts_last_token_is_refused(tmp_path):
    checkpoint = str(merging_dir(tmp_path / "tiny"))
    (tmp_path / "context.txt").write_text(CONTEXT)
    saving = cli("--checkpoint", checkpoint, "--window", "8", "--max-new-tokens", "8", "--context-file",
                 str(tmp_path / "context.txt"), "--save-cache", str(tmp_path / "c.kv"))
    assert saving.returncode == 0, saving.stderr
    load = ("--checkpoint", checkpoint, "--load-cache", str(tmp_path / "c.kv"), "--max-new-tokens", "4")
    assert cli(*load, "--question", "Who?").returncode == 0
    # the context ends in "\n": before "\n\nWho?" its newline and the question's first make one "\n\n" token
    assert_user_error(cli(*load, "--question", "\n\nWho?"), "is tokenized otherwise than when it was saved")


def other_weights(tiny_dir: Path, path: Path) -> Path:
    """The tiny checkpoint with one weight tensor changed a little."""
    write_tiny_dir(path)
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, path / "model.safetensors")
    return path


def test_cli_refuses_what_it_cannot_load_in_one_line(tiny_dir, tmp_path):
    (tmp_path / "context.txt").write_text(CONTEXT)
    file = str(tmp_path / "c.kv")
    assert cli("--checkpoint", str(tiny_dir), "--window", "8", "--max-new-tokens", "8", "--dtype", "float32",
               "--context-file", str(tmp_path / "context.txt"), "--save-cache", file).returncode == 0
    load = ("--load-cache", file, "--question", "Who?", "--dtype", "float32")
    tiny = ("--checkpoint", str(tiny_dir))
    assert_user_error(cli(*tiny, "--load-cache", str(tmp_path / "none.kv"), "--question", "Who?"), "does not exist")
    assert_user_error(cli(*tiny, "--load-cache", str(tiny_dir / "config.json"), "--question", "Who?"),
                      "is not a chunkkv cache")
    assert_user_error(cli(*tiny, *load[:-1], "bfloat16"), "holds 'float32' K/V, the model runs in bfloat16")
    assert_user_error(cli("--checkpoint", str(other_weights(tiny_dir, tmp_path / "other")), *load),
                      "another checkpoint (its weights differ: other values or other --weights)")
    tokenizer = json.loads((tiny_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [{"id": 0, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True}]
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "other" / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert_user_error(cli("--checkpoint", str(tmp_path / "other"), *load), "another checkpoint (its tokenizer differs)")
    assert_user_error(cli(*tiny, *load, "--max-new-tokens", "200"), "left 79 free")  # 96 slots beside 17 kept
    model, tokenizer = load_checkpoint(tiny_dir)  # float32, as the CLI runs with --dtype float32
    save_context(tmp_path / "api.kv", model, tokenizer, compressed(model))  # no text: the API's
    assert_user_error(cli(*tiny, "--load-cache", str(tmp_path / "api.kv"), *load[2:]), "holds no context text")
    forge(Path(file), lambda m: m.update(text_bytes=3000),
          lambda t: t.update(text=torch.full((3000,), ord("x"), dtype=torch.uint8)))
    assert_user_error(cli(*tiny, *load), "is 3,000 bytes, more than the model's context can hold")  # before tokenizing
    assert cli("--checkpoint", str(tiny_dir), "--window", "8", "--max-new-tokens", "8", "--dtype", "float32",
               "--context-file", str(tmp_path / "context.txt"), "--save-cache", file).returncode == 0
    data = Path(file).read_bytes()
    Path(file).write_bytes(data[:-3])
    assert_user_error(cli(*tiny, *load), "is truncated")
    Path(file).write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    assert_user_error(cli(*tiny, *load), "fails its checksum")


def test_cli_flags_that_cannot_reach_a_loaded_cache_are_refused_before_loading(tmp_path, capsys):
    import cli as cli_module
    cases = [(["--load-cache", "c.kv"], "--load-cache needs questions"),
             (["--load-cache", "c.kv", "--question", "Q", "--keep", "0.2"], "drop --keep"),
             (["--load-cache", "c.kv", "--question", "Q", "--method", "snapkv", "--per-head"],
              "drop --method, --per-head"),
             (["--load-cache", "c.kv", "--question", "Q", "--window", "8"], "drop --window"),
             (["--load-cache", "c.kv", "--question", "Q", "--save-cache", "d.kv"], "drop --save-cache"),
             (["--load-cache", "c.kv", "--question", "Q", "--compile-prefill"], "drop --compile-prefill"),
             (["--load-cache", "c.kv", "--question", "Q", "--cache-budget", "64"], "--cache-budget re-compresses"),
             (["--load-cache", "c.kv", "--context-file", "x.txt", "--question", "Q"], "not allowed with argument"),
             (["--load-cache", "c.kv", "--prompt", "hi"], "not allowed with argument"),
             (["--save-cache", "c.kv", "--prompt", "hi"], "--save-cache saves a context compressed before"),
             (["--save-cache", "c.kv", "--interactive"], "--save-cache saves a context compressed before")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_:
            cli_module.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0], (argv, err)
    assert cli_module.session(cli_module.parse_args(["--save-cache", "c.kv"])) == "questions"  # the demo's context
    assert_user_error(cli("--save-cache", str(tmp_path / "missing" / "c.kv"), "--checkpoint", "/nonexistent"),
                      "does not exist or is not writable")  # before the checkpoint is even looked for


# ---------------------------------------------------------------------------------------
# The real default model, end to end

@pytest.mark.model
def test_cli_the_pass_key_demo_from_a_cache_saved_by_another_process(tmp_path):
    """The default model: the demo's context compressed and asked in one process, saved, loaded and asked
    again in another; the same answer, with the key, from a file within 5 % of the kept float32 K/V."""
    file, ask = tmp_path / "demo.kv", ("--question", PASSKEY_QUESTION, "--max-new-tokens", "16", "--dtype", "float32")
    saving = cli("--save-cache", str(file), "--keep", "0.3", *ask, process=True)
    assert saving.returncode == 0 and "found in the answer to question 1" in saving.stdout, saving.stderr
    loading = cli("--load-cache", str(file), *ask, process=True)
    assert loading.returncode == 0, loading.stderr
    assert answers(loading.stdout) == answers(saving.stdout) and passkey_prompt(seed=0)[1] in answers(loading.stdout)[0]
    kept = int(re.search(r"KV kept per layer (\d+) of", loading.stdout)[1])
    assert file.stat().st_size <= 1.05 * kept * 30 * 3 * 64 * 2 * 4  # layers, KV heads, head dim, K and V, float32
