"""What differs between the CPU and CUDA: waiting for queued work, timing it, reading values back
without stalling the queue, the dtype `--dtype auto` picks, and which attention kernels a prefill and
an extend get.

CUDA runs asynchronously: the host queues a step and goes on. A clock read, an `int(tensor)` or a
`bool(tensor)` makes the host wait for everything queued so far, and with CUDA graphs the device
then idles until the host queues the next step. So the decode loop times steps with events and reads
tokens from copies queued right behind them. On the CPU, where every call has finished when it
returns, each of these is the plain thing.
"""
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
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


def cache_then_causal(q: Tensor, k: Tensor, v: Tensor, n_old: int) -> tuple[Tensor, Tensor]:
    """GQA attention on the CPU of new tokens q [B, Hq, T', D] over all the entries [0, n_old) of k, v [B, Hkv,
    slots, D], then causally over their own next T' slots: two flash calls merged by their log-sum-exps, so the
    masked half of the new tokens' own block is never computed (docs/results.md, "A cheaper repeat"). -> (the
    output [B, Hq, T', D], each new token's log-sum-exp of its scaled logits over the new keys up to itself [B, Hq, T'])."""
    (n_batch, n_heads, n_new, head_dim), group = q.shape, q.shape[1] // k.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # private: public SDPA returns no log-sum-exp
    folded = q.reshape(n_batch, k.shape[1], group * n_new, head_dim)  # [B, Hkv, G*T', D]: K/V read once per KV head
    y_old, lse_old = flash(folded, k[:, :, :n_old], v[:, :, :n_old])
    own = [t[:, :, n_old:n_old + n_new].repeat_interleave(group, dim=1) for t in (k, v)]  # [B, Hq, T', D]
    y_new, lse_new = flash(q, *own, is_causal=True)
    lse_old = lse_old.reshape(lse_new.shape)  # [B, Hq, T']
    lse = torch.logaddexp(lse_old, lse_new)
    y = y_old.reshape(y_new.shape).float() * (lse_old - lse).exp()[..., None] + y_new * (lse_new - lse).exp()[..., None]
    return y.to(q.dtype), lse_new  # each part comes rounded to q's dtype; their weighted sum is float32


def shared_mask_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, used: Tensor) -> tuple[Tensor, Tensor | None]:
    """Attention of new tokens q [B, Hq, T', D] over k, v [B, Hkv, slots, D] by one mask [B, T', slots] for every
    KV head (2-2.6x faster on the CPU than a mask per query row), whose rows are nested (each token sees what the
    one before it sees, as positions rise). On the CPU, when every row's new tokens took the slots after its `used`
    [B] ones and see all those: cache_then_causal. Else SDPA. -> (the output [B, Hq, T', D], cache_then_causal's
    log-sum-exps [B, Hq, T'] or None)."""
    n_new = q.shape[2]
    n_old = int(used[0]) - n_new if q.is_cpu else 0  # a host sync, on the CPU only
    if n_old > 0 and bool((used == used[0]).all()):
        ends = torch.tensor([[n_old], [n_old + n_new - 1]], device=mask.device)  # the first and last token's last slot
        expected = torch.arange(mask.shape[-1], device=mask.device) <= ends  # [2, slots]
        # nested rows: the first and the last token's rows fix all the others (a check of the whole mask took 50 ms)
        if torch.equal(mask[:, [0, -1]], expected.expand(len(mask), -1, -1)):
            return cache_then_causal(q, k, v, n_old)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True), None
