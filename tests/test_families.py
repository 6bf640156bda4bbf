"""Model families and checkpoint formats against transformers, the oracle: tiny random models of
each family are built and saved by transformers itself and loaded by chunkkv; GGUF files written
here with the gguf writer are read by transformers' own GGUF import. Each numbered fault of
issue 7's failing list (items 1, 2, 3, 5, 6) has a test below."""
import json
import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import checkpoint
from benchmarks.llama_cpp import interleave  # rotate-half -> llama.cpp's interleaved q/k rows
from checkpoint import CheckpointError
from chunkkv import CompressionConfig
from conftest import TINY_CONFIG, byte_tokenizer, tiny_model
from generate import generate
from model import rope_inv_freq as model_rope_inv_freq

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5)
N_PROMPT, N_NEW = 200, 16  # the prompt is longer than every scaled wavelength threshold below (64 tokens)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

FAMILIES = {  # name: (config class, overrides)
    "llama3-scaling": (LlamaConfig, dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "linear-scaling": (LlamaConfig, dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                         tie_word_embeddings=True)),
    "mistral": (MistralConfig, dict(sliding_window=256)),  # prompt + new tokens fit in the window
    "qwen2-biases": (Qwen2Config, dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                       tie_word_embeddings=True)),
    # q_norm / k_norm over head_dim, which is neither hidden / heads (16) nor Qwen3Config's default (128)
    "qwen3-qk-norm": (Qwen3Config, dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                        tie_word_embeddings=True)),
    "head-dim-and-attention-bias": (LlamaConfig, dict(head_dim=32, attention_bias=True)),
    "untied-head": (LlamaConfig, dict(tie_word_embeddings=False, rope_parameters={"rope_theta": 100000.0})),
}


def randomize(model: torch.nn.Module, seed: int = 0):
    """Weights far from transformers' init (std 0.02, zero biases, unit norms), so RoPE scaling,
    biases and norms all move the logits well above float32 round-off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.2 * noise if "norm" in name else (0.5 if name.endswith("bias") else 0.15) * noise)


def hf_model(config_class, **overrides):
    torch.manual_seed(0)
    config = config_class(**{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def save_hf(model, path):
    model.save_pretrained(path)  # safetensors, transformers' own config.json layout
    byte_tokenizer().save(str(path / "tokenizer.json"))
    return path


def prompt(n_tokens: int = N_PROMPT, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(1))


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)  # transformers returns an output object, chunkkv the tensor


def max_logit_diff(a, b, tokens) -> float:
    return (logits(a, tokens) - logits(b, tokens)).abs().max().item()


def hf_greedy(model, tokens, n_new=N_NEW) -> torch.Tensor:
    out = model.generate(tokens, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, tokens.shape[1]:]


# ---------------------------------------------------------------------------------------
# Hugging Face directories, one per family (items 1 and 5)

@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(tmp_path, family):
    config_class, overrides = FAMILIES[family]
    reference = hf_model(config_class, **overrides)
    model, _ = checkpoint.load(save_hf(reference, tmp_path / family))
    tokens = prompt()
    diff = max_logit_diff(model, reference, tokens)
    print(f"{family}: max |logit diff| {diff:.2e}")
    assert diff < 1e-5
    assert torch.equal(generate(model, tokens, CompressionConfig(method="full"), max_new_tokens=N_NEW).tokens,
                       hf_greedy(reference, tokens))


def test_rope_settings_matter():
    """The comparison above can fail: each family's RoPE settings change the logits by far more
    than its tolerance (so a loader that ignored them would be caught)."""
    tokens = prompt()
    for family, plain in [("llama3-scaling", {"rope_theta": 500000.0}), ("linear-scaling", {}),
                          ("qwen2-biases", {})]:
        config_class, overrides = FAMILIES[family]
        scaled = hf_model(config_class, **overrides)
        unscaled = hf_model(config_class, **{**overrides, "rope_parameters": {"rope_type": "default", **plain}})
        assert max_logit_diff(scaled, unscaled, tokens) > 1e-2, family


def test_transformers_4_config_layout(tmp_path):
    """rope_theta at the top and `rope_scaling` (with the old key `type`), as transformers 4 wrote."""
    reference = hf_model(LlamaConfig, rope_parameters=LLAMA3)
    path = save_hf(reference, tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (path / "config.json").write_text(json.dumps(config))
    old = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, _ = checkpoint.load(path)
    tokens = prompt()
    assert max_logit_diff(old, reference, tokens) == 0  # transformers reads the old layout the same way
    assert max_logit_diff(model, reference, tokens) < 1e-5


@pytest.mark.parametrize("config_class", [LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config])
def test_minimal_config_takes_transformers_defaults(tmp_path, config_class):
    """A config.json with only the required keys: every default (norm eps, tied head, RoPE base,
    context, sliding window, Qwen3's head_dim of 128) is the one transformers takes."""
    path = save_hf(hf_model(config_class, rms_norm_eps=1e-6), tmp_path / "minimal")
    config = json.loads((path / "config.json").read_text())
    required = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size"]
    (path / "config.json").write_text(json.dumps({key: config[key] for key in required}))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, _ = checkpoint.load(path)
    assert model.args.max_seq_len == reference.config.max_position_embeddings
    assert model.args.sliding_window == getattr(reference.config, "sliding_window", None)
    assert model.args.head_dim == reference.model.layers[0].self_attn.head_dim
    assert max_logit_diff(model, reference, prompt()) < 1e-5


def test_mistral_sliding_window_beyond_the_run_is_refused(tmp_path):
    reference = hf_model(MistralConfig, sliding_window=64)
    model, _ = checkpoint.load(save_hf(reference, tmp_path / "mistral"))
    assert model.args.sliding_window == 64
    inside, beyond = prompt(48), prompt(N_PROMPT)
    assert max_logit_diff(model, reference, inside) < 1e-5
    assert torch.equal(generate(model, inside, CompressionConfig(method="full"), max_new_tokens=N_NEW).tokens,
                       hf_greedy(reference, inside))
    # beyond the window transformers' sliding attention differs from full attention: refuse, never run wrong
    full = hf_model(MistralConfig, sliding_window=None)
    assert max_logit_diff(full, reference, beyond) > 1e-2
    for tokens, n_new in [(beyond, 0), (prompt(60), 8)]:
        with pytest.raises(ValueError, match="sliding window of 64"):
            generate(model, tokens, CompressionConfig(method="full"), max_new_tokens=n_new) if n_new else model(tokens)


@pytest.mark.parametrize("config_class", [Qwen2Config, Qwen3Config])
def test_qwen_sliding_window_only_where_layers_slide(tmp_path, config_class):
    sliding = hf_model(config_class, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert checkpoint.load(save_hf(sliding, tmp_path / "slides"))[0].args.sliding_window == 64
    full = hf_model(config_class, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    model, _ = checkpoint.load(save_hf(full, tmp_path / "full"))
    assert model.args.sliding_window is None  # no layer slides: any length runs exactly
    assert max_logit_diff(model, full, prompt()) < 1e-5


# ---------------------------------------------------------------------------------------
# Refusals: one-line CheckpointErrors, never a traceback or wrong logits (items 1, 5 and 6)

@pytest.fixture
def llama_dir(tmp_path):
    return save_hf(hf_model(LlamaConfig), tmp_path / "llama")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def assert_refused(path, *fragments):
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_unimplemented_rope_scaling_is_refused(llama_dir, kind):
    edit_config(llama_dir, rope_parameters={"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0})
    assert_refused(llama_dir, f"RoPE scaling {kind!r} is not supported")
    edit_config(llama_dir, rope_parameters=None, rope_scaling={"type": kind, "factor": 4.0})
    assert_refused(llama_dir, f"RoPE scaling {kind!r} is not supported")


def test_other_families_are_refused(llama_dir):
    edit_config(llama_dir, model_type="gemma")
    assert_refused(llama_dir, "model_type 'gemma' is not supported", "llama, mistral, qwen2")


def test_broken_configs_are_refused(llama_dir):
    edit_config(llama_dir, num_key_value_heads=3)
    assert_refused(llama_dir, "num_key_value_heads 3 does not divide num_attention_heads 4")
    for content in ["null", "[1, 2]", '"llama"']:
        (llama_dir / "config.json").write_text(content)
        assert_refused(llama_dir, "config.json holds", "not a JSON object")


def test_broken_shard_indexes_and_missing_tensors_are_refused(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    (llama_dir / "model.safetensors").unlink()
    index = llama_dir / "model.safetensors.index.json"
    for content, reason in [("{not json", "JSONDecodeError"), ("{}", "KeyError"), ('{"weight_map": {}}', "no shard files"),
                            ('{"weight_map": {"x": 7}}', "TypeError"),
                            ('{"weight_map": {"x": "../elsewhere.safetensors"}}',
                             "shard ../elsewhere.safetensors leaves the checkpoint folder")]:
        index.write_text(content)
        assert_refused(llama_dir, "model.safetensors.index.json is not a valid shard index", reason)
    index.write_text(json.dumps({"weight_map": {name: "model-1.safetensors" for name in weights}}))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_dir / "model-1.safetensors")
    assert_refused(llama_dir, "1 tensors are missing (layers.1.mlp.up_proj.weight)")
    index.write_text(json.dumps({"weight_map": {"x": "model-2.safetensors"}}))
    assert_refused(llama_dir, "model-2.safetensors is missing or corrupt")


# ---------------------------------------------------------------------------------------
# GGUF files (items 2 and 3), compared with transformers' own GGUF import

def llama_cpp_rope_freqs(head_dim: int, params: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's convert_hf_to_gguf.py writes for a llama3-scaled model: a
    divisor per frequency (1 for short wavelengths, the factor for long ones, smooth between)."""
    freqs = 1.0 / params["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    context, low, high = params["original_max_position_embeddings"], params["low_freq_factor"], params["high_freq_factor"]
    divisors = []
    for wavelen in 2 * math.pi / freqs:
        smooth = (context / wavelen - low) / (high - low)
        divisors.append(1.0 if wavelen < context / high else params["factor"] if wavelen > context / low
                        else 1 / ((1 - smooth) / params["factor"] + smooth))
    return np.array(divisors, dtype=np.float32)


GGUF_KINDS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def write_gguf(path, model, arch: str, rope_freqs=None, scaling=None, omit: tuple[str, ...] = ()):
    """A float32 GGUF file of `model` laid out as llama.cpp's converter lays out `arch`, without
    the metadata keys in `omit` (context_length, attention.layer_norm_rms_epsilon)."""
    config = model.config
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads  # Qwen2Config has none
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    if "context_length" not in omit:
        writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if "attention.layer_norm_rms_epsilon" not in omit:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if scaling is not None:  # (gguf.RopeScalingType, factor)
        writer.add_rope_scaling_type(scaling[0])
        writer.add_rope_scaling_factor(scaling[1])
    vocab = json.loads(byte_tokenizer().to_str())["model"]["vocab"]  # 256 tokens, maybe fewer than the rows
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    writer.add_token_list(sorted(vocab, key=vocab.get))
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([])
    writer.add_bos_token_id(3)
    writer.add_eos_token_id(7)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    tied = config.tie_word_embeddings
    for name, w in model.state_dict().items():
        w = w.numpy()
        parts = name.split(".")
        if parts[1] == "layers":
            kind = GGUF_KINDS[".".join(parts[3:-1])]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = interleave(w, n_heads if kind == "attn_q" else n_kv_heads)
            writer.add_tensor(f"blk.{parts[2]}.{kind}.{parts[-1]}", np.ascontiguousarray(w))
        elif not (tied and name == "lm_head.weight"):
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
            writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA_GGUF = dict(head_dim=32, vocab_size=320)  # key_length != dim / heads; more embedding rows than tokens
QWEN_ROPE = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
GGUF_SOURCES = {  # arch: (config class, overrides, head_dim)
    "llama": (LlamaConfig, LLAMA_GGUF, 32),
    "qwen2": (Qwen2Config, QWEN_ROPE, 16),
    # transformers' GGUF import reads no qwen3 head_dim (key_length): it takes Qwen3Config's 128, as
    # Qwen3-0.6B has; chunkkv reads key_length, here 128 != dim / heads
    "qwen3": (Qwen3Config, QWEN_ROPE, 128),
}


@pytest.mark.parametrize("arch", GGUF_SOURCES)
def test_gguf_matches_transformers_gguf_import(tmp_path, arch):
    config_class, overrides, head_dim = GGUF_SOURCES[arch]
    source = hf_model(config_class, **overrides)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", source, arch)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    model, _ = checkpoint.load(path)
    assert model.args.vocab_size == source.config.vocab_size
    assert model.args.head_dim == head_dim
    tokens = prompt(vocab=source.config.vocab_size)
    diff = max_logit_diff(model, reference, tokens)
    print(f"gguf {arch}: max |logit diff| vs transformers' GGUF import {diff:.2e}")
    assert diff < 1e-5
    assert max_logit_diff(model, source, tokens) < 1e-5
    assert torch.equal(generate(model, tokens, CompressionConfig(method="full"), max_new_tokens=N_NEW).tokens,
                       hf_greedy(reference, tokens))
    config = checkpoint.open_gguf(path)[0]
    assert (config["bos_token_id"], config["eos_token_id"]) == (3, 7)


@pytest.mark.parametrize("scaling", ["rope_freqs", "linear"])
def test_gguf_rope_scaling_matches_the_hf_model(tmp_path, scaling):
    """transformers' GGUF import ignores both `rope_freqs` and `llama.rope.scaling.*` (it runs such a
    file unscaled), so the oracle is the Hugging Face model the file was made from."""
    if scaling == "rope_freqs":
        source = hf_model(LlamaConfig, **LLAMA_GGUF, rope_parameters=LLAMA3)
        path = write_gguf(tmp_path / "scaled.gguf", source, "llama", rope_freqs=llama_cpp_rope_freqs(32, LLAMA3))
    else:
        source = hf_model(LlamaConfig, **LLAMA_GGUF, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                     "factor": 4.0})
        path = write_gguf(tmp_path / "scaled.gguf", source, "llama", scaling=(gguf.RopeScalingType.LINEAR, 4.0))
    model, _ = checkpoint.load(path)
    tokens = prompt(vocab=320)
    diff = max_logit_diff(model, source, tokens)
    print(f"gguf llama {scaling}: max |logit diff| vs the transformers model it was made from {diff:.2e}")
    assert diff < 1e-5
    unscaled = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert max_logit_diff(unscaled, source, tokens) > 1e-2  # the scaling matters at this length


def test_gguf_unsupported_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tmp_path / "yarn.gguf", hf_model(LlamaConfig), "llama", scaling=(gguf.RopeScalingType.YARN, 4.0))
    assert_refused(path, "RoPE scaling 'yarn' is not supported")


@pytest.mark.parametrize("key", ["context_length", "attention.layer_norm_rms_epsilon"])
def test_gguf_without_a_required_key_is_refused_at_load(tmp_path, key):
    """llama.cpp refuses these files; chunkkv once converted them with None and failed at the first forward."""
    path = write_gguf(tmp_path / "incomplete.gguf", hf_model(LlamaConfig), "llama", omit=(key,))
    assert_refused(path, f"lacks llama.{key}", "the file is incomplete")


CONVERTED = {  # name: (source model, what write_gguf needs)
    "llama": lambda: (hf_model(LlamaConfig, **LLAMA_GGUF), dict(arch="llama")),
    "qwen2": lambda: (hf_model(Qwen2Config, **QWEN_ROPE), dict(arch="qwen2")),
    "qwen3": lambda: (hf_model(Qwen3Config, **QWEN_ROPE, head_dim=32), dict(arch="qwen3")),
    "llama3-rope_freqs": lambda: (hf_model(LlamaConfig, **LLAMA_GGUF, rope_parameters=LLAMA3),
                                  dict(arch="llama", rope_freqs=llama_cpp_rope_freqs(32, LLAMA3))),
}


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_gguf_is_a_folder_transformers_reads_right(tmp_path, name):
    """A GGUF converted to a Hugging Face folder (what the registry does with named checkpoints)
    loads in transformers' AutoModelForCausalLM with the logits of the model the file came from:
    the right architecture, and Llama 3.1's rope_freqs as the llama3 RoPE scaling it encodes."""
    source, layout = CONVERTED[name]()
    path = write_gguf(tmp_path / f"{name}.gguf", source, **layout)
    checkpoint.convert_gguf(path, tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["architectures"] == [type(source).__name__]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=torch.float32).eval()
    ours, _ = checkpoint.load(tmp_path / "converted")
    tokens = prompt(vocab=source.config.vocab_size)
    assert max_logit_diff(theirs, source, tokens) < 1e-5
    assert max_logit_diff(ours, source, tokens) < 1e-5


def test_llama3_parameters_reproduce_step_divisors():
    """rope_freqs with no blended frequency (each 1 or the factor: possible where the wavelengths are
    far apart) still convert, to a llama3 scaling that gives exactly these divisors."""
    divisors = [1.0, 8.0]  # head_dim 4: wavelengths 707x apart, room for original / 4 and original between
    params = checkpoint.llama3_parameters({"rope_parameters": {"rope_theta": 500000.0}, "rope_freqs": divisors,
                                           "head_dim": 4}, "test")
    args = checkpoint.model_args({**TINY_CONFIG, "model_type": "llama", "head_dim": 4, "rope_parameters": params}, "test")
    base = 1.0 / 500000.0 ** (torch.arange(0, 4, 2) / 4)
    torch.testing.assert_close(base / model_rope_inv_freq(args), torch.tensor(divisors), rtol=1e-4, atol=0)


def test_rope_freqs_that_are_no_llama3_scaling_are_not_converted(tmp_path):
    """Such a file runs as a .gguf (chunkkv divides by rope_freqs as llama.cpp does), but no folder
    transformers reads right can be written for it: the conversion refuses and writes nothing."""
    source = hf_model(LlamaConfig, **LLAMA_GGUF)
    divisors = np.random.default_rng(0).uniform(1, 3, 16).astype(np.float32)
    path = write_gguf(tmp_path / "odd.gguf", source, "llama", rope_freqs=divisors)
    assert checkpoint.load(path)[0].args.rope_freqs is not None
    with pytest.raises(CheckpointError, match="no llama3 RoPE scaling"):
        checkpoint.convert_gguf(path, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


# ---------------------------------------------------------------------------------------
# Writing checkpoints

def test_hf_directory_round_trip(tiny_dir):
    model, tokenizer = checkpoint.load(tiny_dir)
    reference = tiny_model(n_layers=2, tie_embeddings=False, max_seq_len=256, rope_theta=10000.0)
    tokens = torch.tensor([tokenizer.encode("hello, world").ids])
    assert torch.equal(model(tokens), reference(tokens))
    assert not list(tiny_dir.parent.glob(".tiny-*"))  # no temporary folder left behind


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError):
        checkpoint.write_checkpoint(tmp_path / "out", TINY_CONFIG, {}, byte_tokenizer())
    assert list(tmp_path.iterdir()) == []
