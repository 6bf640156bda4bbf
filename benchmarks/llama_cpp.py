"""llama.cpp beside chunkkv in the speed bench (python bench.py speed --llama-bench PATH): the
checkpoint being measured written as GGUF in F32, BF16 and Q8_0, and llama.cpp's own `llama-bench`
run on it at the same context depth, threads and new tokens. The bench never builds llama-bench
(docs/results.md, Speed, says how); without it, no llama.cpp figure is printed."""
import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer

import checkpoint
from model import Transformer
from quantize import weights_of

PRECISIONS = {"F32": gguf.GGMLQuantizationType.F32, "BF16": gguf.GGMLQuantizationType.BF16,
              "Q8_0": gguf.GGMLQuantizationType.Q8_0}
MATCHING = {torch.float32: "F32", torch.bfloat16: "BF16"}  # chunkkv's dtype -> the llama.cpp precision it faces
GGUF_NAMES = {hf: kind for kind, hf in checkpoint.GGUF_NAMES.items()}  # the loader's table, inverted


def interleave(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from rotate-half (pairs i, i + D/2) to the interleaved pairs (2i, 2i+1) llama.cpp's
    llama architecture expects, per head: the inverse of checkpoint.unpermute_rope."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array of every weight, laid out as llama.cpp's converter writes them."""
    args, out = model.args, {}
    arch = "qwen2" if args.qkv_bias else "llama"
    state = model.state_dict()
    for name, w in state.items():
        if name.endswith(".scales"):
            continue  # an int8 layer's, folded into its weight below
        if w.dtype == torch.int8:  # an int8 layer's weight, written dequantized
            w = w.float() * state[name.removesuffix("weight") + "scales"].float()[:, None]
        w = w.float().numpy()
        parts = name.split(".")
        if parts[0] == "layers":
            kind = GGUF_NAMES[".".join(parts[2:-1])]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = interleave(w, args.n_heads if kind == "attn_q" else args.n_kv_heads)
            out[f"blk.{parts[1]}.{kind}.{parts[-1]}"] = w
        elif not (args.tie_embeddings and name == "lm_head.weight"):
            hf = name.removesuffix(".weight")  # embed_tokens, norm, lm_head
            out[f"{GGUF_NAMES[hf if hf == 'lm_head' else 'model.' + hf]}.weight"] = w
    return out


def write_files(model: Transformer, tokenizer: Tokenizer, folder: Path) -> dict[str, Path]:
    """{precision: GGUF path} of the model for llama.cpp, in the precision that faces its weights:
    Q8_0, llama.cpp's 8-bit weights, for int8; F32 or BF16 for weights in the model's dtype. ValueError
    for a dtype llama.cpp's CPU build has no match for (float16)."""
    dtype = model.embed_tokens.weight.dtype
    if weights_of(model) == "int8":
        precision = "Q8_0"
    elif dtype in MATCHING:
        precision = MATCHING[dtype]
    else:
        raise ValueError(f"the llama.cpp comparison runs float32, bfloat16 or int8 weights, not {dtype}")
    return {precision: write_gguf(model, tokenizer, folder / f"model-{precision}.gguf", precision)}


def write_gguf(model: Transformer, tokenizer: Tokenizer, path: Path, precision: str) -> Path:
    """`model` as a GGUF file llama.cpp runs: architecture llama (qwen2 where q/k/v have biases), the
    matrices in `precision` (F32, BF16 or Q8_0: blocks of 32 with one float16 scale), norms and biases
    in F32 as llama.cpp's converter keeps them, and the byte-level BPE vocabulary of `tokenizer`
    (padded to the embedding's rows). Raises ValueError for what this writer does not lay out."""
    args = model.args
    if args.rope_scaling is not None or args.sliding_window is not None or args.o_bias or args.qk_norm:
        raise ValueError("the llama.cpp comparison writes plain Llama and Qwen2 layouts only "
                         "(no RoPE scaling, sliding window, output bias or q/k norms)")
    arch = "qwen2" if args.qkv_bias else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.ffn_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    add_vocabulary(writer, json.loads(tokenizer.to_str()), args.vocab_size)
    for name, w in gguf_tensors(model).items():
        qtype = PRECISIONS[precision] if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = w if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer: dict, n_rows: int):
    """A tokenizer.json's BPE vocabulary as GGUF `gpt2` tokens, merges and types; rows of the
    embedding past the vocabulary become unused [PADn] tokens, as llama.cpp's converter writes them."""
    ids = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}}
    control = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    tokens = {i: token for token, i in ids.items()}
    writer.add_tokenizer_model("gpt2")  # no pre-tokenizer named: llama-bench feeds token ids, text is never split
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(n_rows)])
    writer.add_token_types([3 if i in control else 1 if i in tokens else 5 for i in range(n_rows)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])


def llama_bench(binary: str, path: Path, depth: int, n_new: int, threads: int, repeats: int = 3) -> dict:
    """llama-bench on `path`: decode of `n_new` tokens after a context of `depth`, and prefill of
    `depth` tokens: {"decode_tokens_per_s", "prefill_tokens_per_s", and their standard deviations}."""
    def run(*test: str) -> dict:
        command = [binary, "-m", str(path), "-t", str(threads), "-r", str(repeats), "-o", "json", *test]
        return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)[0]
    decode, prefill = run("-p", "0", "-n", str(n_new), "-d", str(depth)), run("-p", str(depth), "-n", "0")
    return {"decode_tokens_per_s": decode["avg_ts"], "decode_stddev": decode["stddev_ts"],
            "prefill_tokens_per_s": prefill["avg_ts"], "prefill_stddev": prefill["stddev_ts"]}
