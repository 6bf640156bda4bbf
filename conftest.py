"""Shared fixtures and references for the tests (test_chunkkv.py and tests/): tiny random models,
a tiny checkpoint folder, the CLI in a subprocess, plain-Python chunk selection, and one masked
reference attention, written out independently of the cache, that every "attends to exactly what
was kept" test compares against. Test files import these helpers from here, never from each other."""
import io
import os
import resource
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import checkpoint
from chunkkv import CompressionConfig
from model import CacheRequest, ModelArgs, Transformer

ROOT = Path(__file__).parent
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=1024)
EVERY_METHOD = [  # every method, per-head ChunkKV included: (label, config without a budget)
    ("full", dict(method="full")), ("streaming", dict(method="streaming")), ("h2o", dict(method="h2o")),
    ("snapkv", dict(method="snapkv")), ("pyramidkv", dict(method="pyramidkv")), ("chunkkv", dict(method="chunkkv")),
    ("chunkkv-per-head", dict(method="chunkkv", per_head=True)),
    ("fastgen", dict(method="fastgen", special_ids=(0,), punctuation_ids=(1, 2))),
]


# ---------------------------------------------------------------------------------------
# Tiny random models through the cache

def tiny_model(n_layers: int = 2, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**{**TINY, "n_layers": n_layers, **overrides})).eval()


def prefill(model: Transformer, tokens: torch.Tensor, config: CompressionConfig, room: int, **request) -> torch.Tensor:
    """Prefill and compress `tokens` [B, T], leaving `room` free slots; last logits [B, vocab]."""
    n_batch, n_prompt = tokens.shape
    budgets = [config.layer_budgets(n_prompt, model.args.n_layers)] * n_batch
    return model.prefill(tokens, CacheRequest(config, [n_prompt] * n_batch, budgets, room, tokens=tokens,
                                              **request))[0]


def run_forced(model: Transformer, prompt: torch.Tensor, config: CompressionConfig, forced: torch.Tensor):
    """Prefill, then teacher-force `forced` [B, n]; logits after the prompt and after each forced token."""
    logits = [prefill(model, prompt, config, forced.shape[1] + 1)]
    for step in range(forced.shape[1]):
        logits.append(model.decode(forced[:, step:step + 1]))
    return torch.stack(logits, dim=1)  # [B, n + 1, vocab]


def kept_positions(model: Transformer, n_prompt: int, per_head: bool = False) -> list[torch.Tensor]:
    """Each layer's kept prompt positions: [B, Hkv, N] per KV head, or [B, N] for a per-layer method."""
    kept = model.kept_positions([n_prompt] * model.caches()[0].pos.shape[0])
    return kept if per_head else [positions[:, 0] for positions in kept]


@torch.no_grad()  # as generate runs it: a compiled step then freezes the weights (compile_decode)
def greedy(model: Transformer, logits: torch.Tensor, n_steps: int, decode=None):
    """Greedy tokens [B, n] and the logits [B, n, vocab] each step produced."""
    decode = decode or model.decode
    tokens, all_logits = [], []
    for _ in range(n_steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        logits = decode(token).clone()
        all_logits.append(logits)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


# ---------------------------------------------------------------------------------------
# Independent references

def reference_select(scores: list[float], budget: int, window: int, chunk_size: int) -> list[int]:
    """design.md §1 step 4 written as plainly as possible; and the host rule (CompressionConfig.host):
    a budget of the window or less keeps the last `budget` tokens."""
    n_prompt = len(scores)
    if n_prompt <= budget:
        return list(range(n_prompt))
    if budget <= window:
        return list(range(n_prompt - budget, n_prompt))
    n_prefix = n_prompt - window
    chunks = [list(range(start, min(start + chunk_size, n_prefix))) for start in range(0, n_prefix, chunk_size)]
    ranked = sorted(chunks, key=lambda chunk: (-sum(scores[p] for p in chunk), chunk[0]))
    fill_order = [p for chunk in ranked for p in chunk]
    return sorted(fill_order[:budget - window] + list(range(n_prefix, n_prompt)))


def masked_reference(model: Transformer, tokens: torch.Tensor, seen: list[torch.Tensor]):
    """Uncached forward, written out independently: each query of layer l and KV head h attends
    to exactly the positions seen[l][b, h, query] at their original RoPE positions. Logits
    [B, n, vocab] and each layer's queries [B, Hq, n, D]."""
    args = model.args
    n_batch, n_tokens = tokens.shape
    group = args.n_heads // args.n_kv_heads
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
    angles = torch.cat([torch.outer(torch.arange(n_tokens).float(), inv_freq)] * 2, dim=-1)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * angles.sin()

    x, queries = model.embed_tokens(tokens), []
    for layer, block in enumerate(model.layers):
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = rotate(attn.q_proj(h).view(n_batch, n_tokens, args.n_heads, -1).transpose(1, 2))
        k = rotate(attn.k_proj(h).view(n_batch, n_tokens, args.n_kv_heads, -1).transpose(1, 2))
        v = attn.v_proj(h).view(n_batch, n_tokens, args.n_kv_heads, -1).transpose(1, 2)
        scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / args.head_dim ** 0.5
        visible = seen[layer].repeat_interleave(group, dim=1)
        y = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(group, dim=1)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(n_batch, n_tokens, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
        queries.append(q)
    return model.lm_head(model.norm(x)), queries


def reference_logits(model: Transformer, tokens: torch.Tensor, kept: list[torch.Tensor], n_prompt: int):
    """Uncached forward over `tokens` [B, n]: the prompt [0, n_prompt) attends causally in full;
    every later token sees, of the prompt, exactly the positions each layer kept (per row, and per
    KV head for per-head methods; -1 = nothing), and causally every later token."""
    n_batch, n_tokens = tokens.shape
    n_kv_heads = model.args.n_kv_heads
    seen = []
    for positions in kept:
        positions = positions if positions.dim() == 3 else positions[:, None].expand(-1, n_kv_heads, -1)
        in_cache = torch.zeros(n_batch, n_kv_heads, n_prompt + 1, dtype=torch.bool)
        in_cache.scatter_(2, torch.where(positions >= 0, positions, n_prompt), True)  # -1 -> a spare column
        visible = torch.ones(n_batch, n_kv_heads, n_tokens, n_tokens, dtype=torch.bool).tril()
        visible[:, :, n_prompt:, :n_prompt] = in_cache[:, :, None, :n_prompt]
        seen.append(visible)
    return masked_reference(model, tokens, seen)[0]


# ---------------------------------------------------------------------------------------
# Checkpoints and the command line

def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 256, "tie_word_embeddings": False}


def write_tiny_dir(path: Path, context: int = 256) -> Path:
    """A tiny random Llama as a Hugging Face directory, with a byte-level tokenizer."""
    model = tiny_model(n_layers=2, tie_embeddings=False, max_seq_len=context, rope_theta=10000.0)
    state = {f"model.{k}" if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    checkpoint.write_checkpoint(path, {**TINY_CONFIG, "max_position_embeddings": context}, state, byte_tokenizer())
    return path


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return write_tiny_dir(tmp_path / "tiny")


@pytest.fixture(scope="session")
def bench_checkpoint(tmp_path_factory) -> str:
    """A tiny checkpoint with a 4k context: every benchmark's machinery runs on it in seconds."""
    return str(write_tiny_dir(tmp_path_factory.mktemp("bench") / "tiny", context=4096))


def write_tiny_gguf(path: Path, block_count: int = 1):
    """A 1-layer Llama GGUF with random weights and a byte-level tokenizer (256 tokens); a
    `block_count` other than 1 is a lie the metadata tells."""
    dim, ffn, n_heads, n_kv_heads, vocab = 16, 32, 2, 1, sorted(pre_tokenizers.ByteLevel.alphabet())
    kv_dim = dim // n_heads * n_kv_heads
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")  # the default model's pre-tokenizer
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([])
    shapes = {"token_embd": (len(vocab), dim), "output_norm": (dim,), "output": (len(vocab), dim),
              "blk.0.attn_norm": (dim,), "blk.0.ffn_norm": (dim,), "blk.0.attn_q": (dim, dim),
              "blk.0.attn_k": (kv_dim, dim), "blk.0.attn_v": (kv_dim, dim), "blk.0.attn_output": (dim, dim),
              "blk.0.ffn_gate": (ffn, dim), "blk.0.ffn_up": (ffn, dim), "blk.0.ffn_down": (dim, ffn)}
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32) * 0.2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def cli(*args, env=None, stdin: str | None = None, script: str = "generate.py",
        process: bool = False) -> subprocess.CompletedProcess:
    """generate.py (or bench.py) with these arguments: in this process (generate.main, fast), or in
    a fresh one from the checkout (`process`, always for bench.py), as a user runs it."""
    if process or script != "generate.py":
        return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                              input=stdin, env={**os.environ, **(env or {})}, cwd=ROOT)
    import generate

    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err), patch("sys.stdin", io.StringIO(stdin or "")):
            try:
                code = generate.main(list(args)) or 0
            except SystemExit as e:
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def cli_bounded(*args, memory_gb: float = 6, timeout: float = 60) -> subprocess.CompletedProcess:
    """generate.py with these arguments in a fresh process under an address-space cap (setrlimit)
    and a time limit, for hostile inputs: a run past either fails the test (exit 124 for the time)."""
    limit = int(memory_gb * 2 ** 30)
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # noqa: E731
    try:
        return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                              cwd=ROOT, preexec_fn=cap, timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(args, 124, e.stdout or "", f"timed out after {timeout} s")


def assert_user_error(result, *fragments, progress=False):
    """Exit status 2 and one error line naming the problem (after progress output, if any)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (progress or len(lines) == 1) and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
