"""Hostile and careless inputs (issue 23): a checkpoint, a prompt file or an API call that is
wrong ends in one line naming the problem (CLI: `error:` and exit status 2), never a traceback, a
hang or a machine out of memory. Cases that could hang or exhaust memory run in a subprocess
under a memory cap and a time limit (conftest.cli_bounded)."""
import io
import json
import subprocess
import sys

import pytest
import torch

import checkpoint
import generate
from checkpoint import CheckpointError
from conftest import ROOT, assert_user_error, cli, cli_bounded, write_tiny_dir, write_tiny_gguf

torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------
# Configs: every field checked for type and range, and against the tensors, before building

FIELDS = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
          "tie_word_embeddings", "head_dim", "attention_bias", "mlp_bias", "hidden_act", "rope_scaling",
          "rope_parameters", "partial_rotary_factor"]
VALUES = [None, -1, 0, "x", 1e9, [], {}, True, 3.5]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = write_tiny_dir(tmp_path_factory.mktemp("hostile") / "tiny")
    return path, checkpoint.load(path)[0]


@pytest.mark.parametrize("value", VALUES, ids=repr)
@pytest.mark.parametrize("key", FIELDS)
def test_each_config_field_loads_or_is_refused_in_one_line(original, tmp_path, key, value):
    path, model = original
    edited = tmp_path / "edited"
    edited.mkdir()
    for file in path.iterdir():
        (edited / file.name).symlink_to(file)
    config = json.loads((path / "config.json").read_text())
    (edited / "config.json").unlink()
    (edited / "config.json").write_text(json.dumps({**config, key: value}))
    try:
        loaded = checkpoint.load(edited)[0]
    except CheckpointError as e:
        assert "\n" not in str(e) and str(edited) in str(e)
        return
    weights = {name: w for name, w in loaded.state_dict().items() if not name.startswith("lm_head")}
    assert all(torch.equal(w, model.state_dict()[name]) for name, w in weights.items())  # a tied head may differ
    assert loaded(torch.tensor([[1, 2, 3]])).isfinite().all()


def huge(path, **config):
    """The tiny checkpoint at `path` with some config fields replaced."""
    write_tiny_dir(path)
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **config}))
    return path


@pytest.mark.parametrize("case", ["num_hidden_layers", "hidden_size", "block_count"])
def test_sizes_the_file_does_not_hold_are_refused_at_once(tmp_path, case):
    if case == "block_count":
        write_tiny_gguf(tmp_path / "huge.gguf", block_count=10 ** 9)
        path, fragment = tmp_path / "huge.gguf", "the config has 1000000000 layers, the weights hold 1"
    elif case == "num_hidden_layers":
        path, fragment = huge(tmp_path / "huge", num_hidden_layers=10 ** 9), "the config has 1000000000 layers"
    else:
        path, fragment = huge(tmp_path / "huge", hidden_size=10 ** 12), "hidden_size is 1000000000000, expected"
    assert_user_error(cli_bounded("--checkpoint", str(path), "--prompt", "hi", "--max-new-tokens", "1",
                                  "--device", "cpu"), fragment)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_safetensors_are_refused_not_upcast(tmp_path, dtype):
    from safetensors.torch import load_file, save_file
    path = write_tiny_dir(tmp_path / "tiny")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].to(dtype)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert str(error.value) == (f"{path / 'model.safetensors'}: tensor model.layers.0.mlp.up_proj.weight is "
                                f"{'I8' if dtype == torch.int8 else 'F8_E4M3'}, not float weights (F64, F32, F16, BF16): "
                                "quantized safetensors are not supported; use the unquantized checkpoint or a GGUF file")


# ---------------------------------------------------------------------------------------
# Bad text: one line naming the file and line, or the flag

JSONL = {"lone surrogate": ('"ok"\n"\\ud800"\n', "line 2 is not valid UTF-8 text"),
         "deep nesting": ('"ok"\n' + "[" * 100_000 + "]" * 100_000 + "\n", "line 2 is not JSON"),
         "5,000-digit integer": ('{"prompt": "x", "n": ' + "7" * 5000 + "}\n", "line 1 is not JSON")}


@pytest.mark.parametrize("case", JSONL)
def test_bad_jsonl_lines_are_one_line_naming_the_line(tiny_dir, tmp_path, case):
    text, fragment = JSONL[case]
    (tmp_path / "p.jsonl").write_text(text)
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--prompts-jsonl", str(tmp_path / "p.jsonl")),
                      f"{tmp_path / 'p.jsonl'} {fragment}")


@pytest.mark.parametrize("flag", ["--prompt", "--question"])
def test_a_flag_with_undecodable_bytes_is_one_line(tiny_dir, flag):
    argv = ["--prompt", "caf\udce9"] if flag == "--prompt" else ["--question", "caf\udce9?"]  # argv's surrogateescape
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--max-new-tokens", "2", *argv), f"{flag} is not valid UTF-8")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin, and a C locale's
def test_interactive_stdin_that_is_not_utf8_is_one_line(tiny_dir, monkeypatch, capsys, errors):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors=errors))
    try:
        code = generate.main(["--checkpoint", str(tiny_dir), "--interactive", "--max-new-tokens", "2"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert_user_error(subprocess.CompletedProcess([], code, "", err), "stdin", "UTF-8")


# ---------------------------------------------------------------------------------------
# Text the context cannot hold: refused by its size, before the tokenizer spends memory on it

def test_a_50_mb_prompt_file_is_refused_before_tokenizing(tiny_dir, tmp_path):
    """Tokenizing 20 MB took 3-5 GB: under a 6 GiB cap the run would die inside the tokenizer."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * 10_000_000)
    assert_user_error(cli_bounded("--checkpoint", str(tiny_dir), "--prompt-file", str(big), "--device", "cpu"),
                      f"{big} is 50,000,000 bytes, more than the model's context can hold as tokens "
                      "(at most 2,048 bytes): shorten it")  # byte-level vocabulary: 2 bytes a token, x 4, x 256


@pytest.mark.parametrize("source", ["--prompt", "--prompt-file", "--prompts-jsonl", "--context-file", "--question",
                                    "--interactive"])
def test_every_text_source_is_checked_for_size(tiny_dir, tmp_path, source):
    text, file = "z" * 2049, tmp_path / "in.txt"
    file.write_text(json.dumps(text) + "\n" if source == "--prompts-jsonl" else text)
    argv, name = {"--prompt": (["--prompt", text], "the prompt"),
                  "--prompt-file": (["--prompt-file", str(file)], str(file)),
                  "--prompts-jsonl": (["--prompts-jsonl", str(file)], "prompt line 1"),
                  "--context-file": (["--context-file", str(file), "--question", "q?"], str(file)),
                  "--question": (["--context-file", str(tiny_dir / "config.json"), "--question", text], "question 1"),
                  "--interactive": (["--interactive"], "stdin line 1")}[source]
    result = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(tiny_dir), *argv], cwd=ROOT,
                            input=text + "\n" if source == "--interactive" else None, capture_output=True, text=True)
    assert_user_error(result, f"{name} is 2,049 bytes" if source != "--interactive" else "stdin line 1 is 2,050 bytes",
                      "(at most 2,048 bytes): shorten it", progress=source == "--interactive")
