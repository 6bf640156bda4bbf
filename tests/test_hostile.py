"""Hostile and careless inputs (issue 23): a checkpoint, a prompt file or an API call that is
wrong ends in one line naming the problem (CLI: `error:` and exit status 2), never a traceback, a
hang or a machine out of memory. Cases that could hang or exhaust memory run in a subprocess
under a memory cap and a time limit (conftest.cli_bounded)."""
import json

import pytest
import torch

import checkpoint
from checkpoint import CheckpointError
from conftest import assert_user_error, cli_bounded, write_tiny_dir, write_tiny_gguf

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
