"""Weight-only int8 linear layers (gpt-fast's int8 mode): each weight row, one output channel, is
stored as int8 with one scale, so a decode step reads a byte per weight instead of two.

    from registry import load
    model, tokenizer = load(dtype=torch.bfloat16, weights="int8")  # or quantize.int8_weights(model)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Transformer
from tokenizer import CheckpointError

WEIGHTS = ("dtype", "int8")  # the linear layers' weights: in the model's dtype, or int8 per output channel
GEMV_ROWS = 16  # up to this many rows (decode: one per batch row) go through the int8 kernel


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 per row of w [N, K]: (q int8 [N, K], scales float32 [N]) with
    w ~= q * scales[:, None]; rounded half to even, |q| <= 127; scale 1 where max |w| / 127 is 0."""
    scales = w.float().abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all zeros, or below float32's range
    return (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """y = x @ (q * scales)^T + bias for x [..., K] -> [..., N]. Up to GEMV_ROWS rows (decode) run
    through torch._weight_int8pack_mm, which reads the int8 bytes; more rows (a prefill) dequantize
    the weight to x's dtype for one GEMM, as the int8 kernel, a matrix-vector product, is several
    times slower than the GEMM on a prompt's rows (docs/results.md, int8 weights)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scales = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", q)  # [N, K] int8
        self.register_buffer("scales", scales.to(linear.weight.dtype))  # [N], in the activations' dtype
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [B*T, K]
        if rows.shape[0] <= GEMV_ROWS:  # a Python check on a shape: each case compiles once
            y = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.scales)
        else:
            y = F.linear(rows, self.weight.to(x.dtype)) * self.scales
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def check_weights(weights: str, device: torch.device, dtype: torch.dtype):
    """CheckpointError unless `weights` is one of WEIGHTS that runs on `device` in `dtype`: int8 runs on
    the CPU in bfloat16 or float16 only (torch's int8 kernel takes float32 activations ~15x slower than
    its int8 bytes allow, and is not what CUDA would use)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights {weights!r} are not a kind chunkkv runs: pass {' or '.join(WEIGHTS)}")
    if weights == "int8" and (device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16)):
        raise CheckpointError(f"int8 weights run on the CPU in bfloat16 or float16, not {str(dtype)[6:]} on "
                              f"{device.type}: pass --dtype bfloat16 --device cpu, or leave out --weights int8")


def int8_weights(model: Transformer) -> Transformer:
    """Replace every nn.Linear of `model` (attention, MLP, the LM head; not the embedding) by an
    Int8Linear, in place; CheckpointError as check_weights says."""
    check_weights("int8", model.embed_tokens.weight.device, model.embed_tokens.weight.dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def weights_of(model: Transformer) -> str:
    """Which of WEIGHTS `model`'s linear layers hold."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "dtype"
