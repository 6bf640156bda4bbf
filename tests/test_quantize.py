"""Weight-only int8 (quantize.py) against plain references: the rounding rule, each layer's product
with the dequantized weight, and a whole tiny model; compiled equals eager; refusals."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkkv import CompressionConfig
from benchmarks import llama_cpp
from benchmarks.speed import step_weight_bytes
from conftest import assert_user_error, byte_tokenizer, cli, greedy, prefill, tiny_model
from generate import answer, compile_decode, compress_context, load_context, save_context
from quantize import GEMV_ROWS, Int8Linear, int8_weights, quantize_rows
from registry import load
from tokenizer import CheckpointError


def reference_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: scale = max |w| / 127 (1 where that is 0), q = w / scale rounded half to even, in float32."""
    q, scales = np.zeros(w.shape, np.int8), np.ones(w.shape[0], np.float32)
    for i, row in enumerate(w.astype(np.float32)):
        scale = np.float32(max(abs(float(x)) for x in row)) / np.float32(127)
        if scale > 0:
            scales[i] = scale
        q[i] = [max(-127, min(127, int(np.rint(np.float32(x) / scales[i])))) for x in row]
    return q, scales


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=12), min_size=1, max_size=6)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_rows_are_quantized_as_the_plain_rule_says(rows):
    w = np.array(rows, np.float32)
    q, scales = quantize_rows(torch.from_numpy(w))
    expected_q, expected_scales = reference_rows(w)
    assert np.array_equal(q.numpy(), expected_q)
    assert np.array_equal(scales.numpy(), expected_scales)


@pytest.mark.parametrize("n_rows", [1, GEMV_ROWS, GEMV_ROWS + 1, 200])  # the int8 kernel, then the dequantized GEMM
@pytest.mark.parametrize("bias", [False, True])
def test_a_layer_is_its_dequantized_weight_times_x(n_rows, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias).to(torch.bfloat16)
    layer = Int8Linear(linear)
    x = torch.randn(2, n_rows, 96, dtype=torch.bfloat16)
    w = layer.weight.double() * layer.scales.double()[:, None]  # [N, K], exactly the stored weight
    product, b = x.double() @ w.T, linear.bias.double() if bias else torch.zeros(80, dtype=torch.float64)
    got = layer(x)
    assert got.shape == (2, n_rows, 80) and got.dtype == torch.bfloat16
    # bfloat16 roundings, half a unit of the last place (2^-8) each: the product, its scaling, the bias's sum
    assert ((got.double() - (product + b)).abs() <= 2 ** -8 * (3 * product.abs() + b.abs()) + 1e-6).all()


def dequantized(model):
    """A float32 copy of the int8 `model` whose linear weights are q * scale: the plain reference."""
    reference = copy.deepcopy(model).float()
    for module in list(reference.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=child.bias is not None)
                linear.weight.data = child.weight.float() * child.scales.float()[:, None]
                if child.bias is not None:
                    linear.bias.data = child.bias.float()
                setattr(module, name, linear)
    return reference


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": True}])
def test_a_tiny_int8_model_gives_its_dequantized_references_logits(overrides):
    model = int8_weights(tiny_model(**overrides).to(torch.bfloat16))
    assert all(not isinstance(m, nn.Linear) for m in model.modules())
    reference = dequantized(model)
    prompt = torch.randint(0, 256, (2, 40))
    config = CompressionConfig(method="full")
    logits, expected = prefill(model, prompt, config, 8), prefill(reference, prompt, config, 8)
    scale = expected.abs().max().item()  # bf16 activations against float32: a few units of the last place
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=0.02 * scale)
    token = logits.argmax(-1, keepdim=True)
    torch.testing.assert_close(model.decode(token).float(), reference.decode(token), rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("n_batch", [1, 2])  # batch 1: unfrozen weights
def test_compiled_int8_decode_matches_eager_and_does_not_recompile(n_batch):
    torch._dynamo.reset()
    model = int8_weights(tiny_model().to(torch.bfloat16))
    compiled = compile_decode(model)
    prompt = torch.randint(0, 256, (n_batch, 50))
    for i, config in enumerate((CompressionConfig(budget=20, window=4), CompressionConfig(method="full"))):
        eager_tokens, eager_logits = greedy(model, prefill(model, prompt, config, 8, n_slots=128), 8, model.decode)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            tokens, logits = greedy(model, prefill(model, prompt, config, 8, n_slots=128), 8, compiled)
        assert torch.equal(tokens, eager_tokens)
        scale = eager_logits.abs().max().item()
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("kw, problem", [
    (dict(dtype=torch.float32, weights="int8"), "int8 weights run on the CPU in bfloat16 or float16, not float32 on cpu"),
    (dict(dtype=torch.bfloat16, weights="int4"), "weights 'int4' are not a kind chunkkv runs: pass dtype or int8"),
])
def test_weights_that_cannot_run_are_refused_before_loading(kw, problem, monkeypatch):
    monkeypatch.setattr("registry.resolve", lambda _: pytest.fail("resolved (fetched) before refusing"))
    with pytest.raises(CheckpointError, match="^" + problem):
        load("smollm2-135m", **kw)


def test_a_saved_cache_runs_only_on_the_weights_that_saved_it(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    int8 = int8_weights(copy.deepcopy(model))
    tokenizer = byte_tokenizer()
    question = torch.randint(0, 256, (1, 5))
    for saver, loader in ((model, int8), (int8, model)):
        path = tmp_path / "context.kv"
        context = compress_context(saver, torch.randint(0, 256, (1, 60)), CompressionConfig(budget=40, window=4), 12)
        save_context(path, saver, tokenizer, context)
        with pytest.raises(CheckpointError, match=r"another checkpoint \(its weights differ: other values or other --weights\)"):
            load_context(path, loader, tokenizer)
    expected = answer(int8, context, question, 4).tokens  # int8 saved last: it loads its own file
    assert torch.equal(answer(int8, load_context(path, int8, tokenizer), question, 4).tokens, expected)


def test_the_roofline_counts_the_bytes_a_step_reads():
    args = tiny_model().args
    dim, q, kv, ffn, vocab = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim, args.vocab_size
    matrices = args.n_layers * (dim * q * 2 + dim * kv * 2 + 3 * dim * ffn) + vocab * dim  # the LM head's too
    norms = (2 * args.n_layers + 1) * dim
    for tie in (False, True):
        model = tiny_model(tie_embeddings=tie).to(torch.bfloat16)
        assert step_weight_bytes(model) == 2 * (matrices + norms)  # a tied embedding is the head; else one row
        int8 = int8_weights(model)
        n_rows = args.n_layers * (q + 2 * kv + 2 * ffn + 2 * dim) + vocab  # one bfloat16 scale per output row
        assert step_weight_bytes(int8) == matrices + 2 * n_rows + 2 * norms


def test_the_weights_bench_compares_int8_with_the_dtype(bench_checkpoint, tmp_path):
    out = tmp_path / "weights.json"
    result = cli("weights", "--quick", "--dtype", "bfloat16", "--checkpoint", bench_checkpoint, "--out", str(out),
                 script="bench.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(r["weights"], r["metric"]): r["values"] for r in json.loads(out.read_text())}
    assert set(rows) == {("dtype", "nll_per_token"), ("int8", "nll_per_token"), ("int8", "kl_to_dtype"),
                         ("int8", "greedy_agrees")}
    assert all(len(v) == 32 for v in rows.values()) and rows["dtype", "nll_per_token"] != rows["int8", "nll_per_token"]
    assert all(0 <= x < 0.5 for x in rows["int8", "kl_to_dtype"]) and "KL to dtype" in result.stdout
    assert_user_error(cli("weights", "--quick", "--dtype", "float32", "--checkpoint", bench_checkpoint, script="bench.py"),
                      "int8 weights run on the CPU in bfloat16 or float16, not float32")


def test_the_cli_refuses_int8_in_float32_before_loading(tiny_dir):
    assert_user_error(cli("--checkpoint", str(tiny_dir), "--weights", "int8", "--dtype", "float32", "--prompt", "hi"),
                      "int8 weights run on the CPU in bfloat16 or float16, not float32 on cpu: pass --dtype bfloat16")
    result = cli("--checkpoint", str(tiny_dir), "--weights", "int8", "--prompt", "hi", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr  # auto: bfloat16 under int8


def test_llama_cpp_is_given_the_int8_models_weights_dequantized():
    model = int8_weights(tiny_model(tie_embeddings=False).to(torch.bfloat16))
    tensors = llama_cpp.gguf_tensors(model)
    for name, layer in (("blk.0.ffn_gate.weight", model.layers[0].mlp.gate_proj), ("output.weight", model.lm_head)):
        assert np.array_equal(tensors[name], (layer.weight.float() * layer.scales.float()[:, None]).numpy())
    assert not any("scales" in name for name in tensors)
