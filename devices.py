"""What differs between the CPU and CUDA: waiting for queued work, timing it, reading values back
without stalling the queue, the dtype `--dtype auto` picks, and which attention kernel a prefill gets.

CUDA runs asynchronously: the host queues a step and goes on. A clock read, an `int(tensor)` or a
`bool(tensor)` makes the host wait for everything queued so far, and with CUDA graphs the device
then idles until the host queues the next step. So the decode loop times steps with events and reads
tokens from copies queued right behind them. On the CPU, where every call has finished when it
returns, each of these is the plain thing.
"""
import time
from contextlib import contextmanager

import torch
from torch import Tensor


def synchronize(device: torch.device):
    """Wait for the work queued on `device` (CUDA runs asynchronously): read a clock only after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times each step of a loop without making the host wait per step: CUDA events (on the CPU, the
    clock), read once by `seconds`. A step during which Dynamo compiled or a CUDA graph was recorded
    (both announce it through Dynamo's start callbacks) is warm-up, not speed."""

    def __init__(self, device: torch.device):
        self.device, self.steps = device, []  # steps: (start, end, warmed up)

    def mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def step(self):
        starts = []
        torch._dynamo.callback_handler.register_start_callback(starts.append)  # per step: reset() clears them
        start = self.mark()
        try:
            yield
        finally:
            torch._dynamo.callback_handler.remove_start_callback(starts.append)
        self.steps.append((start, self.mark(), bool(starts)))

    def seconds(self, n_steps: int) -> tuple[list[float], list[float]]:
        """(seconds of each steady step, of each warm-up step) among the first `n_steps`."""
        synchronize(self.device)
        seconds = [(end - start if isinstance(start, float) else start.elapsed_time(end) / 1000, warm)  # ms
                   for start, end, warm in self.steps[:n_steps]]
        return [s for s, warm in seconds if not warm], [s for s, warm in seconds if warm]


def host_copy(t: Tensor) -> tuple[Tensor, object]:
    """(a CPU copy of t queued behind the work so far, the event it completes), for `read`: the host
    then waits for t alone, never for steps queued after it. On the CPU, t itself."""
    if not t.is_cuda:
        return t, None
    copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    copy.copy_(t, non_blocking=True)  # a pinned target: the copy is queued, not waited for
    event = torch.cuda.Event()
    event.record()
    return copy, event


def read(copied: tuple[Tensor, object]) -> Tensor:
    """The CPU tensor of a `host_copy`, once its copy has completed."""
    copy, event = copied
    if event is not None:
        event.synchronize()
    return copy


def auto_dtype(device: torch.device, weights: str = "dtype") -> torch.dtype:
    """--dtype auto: bfloat16 on CUDA GPUs of compute capability 8.0 and up, float16 on older ones
    (no bfloat16 tensor cores there); on CPUs with native bfloat16 dot products (AVX512-BF16 or
    AMX), where it prefilled 1.3-2.6x faster than float32 here (docs/results.md, Speed), and with
    int8 weights (the int8 kernel's activations), bfloat16; float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    # private helpers, but the only way torch tells which instructions its kernels may use
    native_bf16 = device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return torch.bfloat16 if native_bf16 or weights == "int8" else torch.float32


def fused_attention(n_batch: int, args, weight: Tensor) -> bool:
    """Whether SDPA runs the prefill's causal GQA attention (args: a model.ModelArgs) on `weight`'s device
    and dtype without the [B, Hq, T, T] scores: on CUDA, a flash, memory-efficient or cuDNN kernel for it."""
    if weight.device.type != "cuda":  # CPU's SDPA kernel tiles the scores
        return True
    q = torch.empty(n_batch, args.n_heads, 1, args.head_dim, dtype=weight.dtype, device=weight.device)  # T: no matter
    cuda = torch.backends.cuda
    params = cuda.SDPAParams(q, q[:, :args.n_kv_heads], q[:, :args.n_kv_heads], None, 0.0, True, True)
    return any(can(params) for can in (cuda.can_use_flash_attention, cuda.can_use_efficient_attention,
                                       cuda.can_use_cudnn_attention))
