"""Timing and memory benchmarks (python bench.py speed | throughput | questions | load): prefill,
compression and decode against the machine's limits; decode tokens/s at equal KV-cache memory; k
questions about one document, compressed once or prefilled k times; a checkpoint's peak memory
while it loads."""
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import llama_cpp
from benchmarks.common import (KEYS, Progress, compress, decode_step_seconds, kept_per_layer, replicated,
                               stdlib_paragraphs, table, take_prose)
from chunkkv import CompressionConfig
from contexts import save_context
from devices import synchronize
from generate import answer, compile_decode, compress_context, generate
from quantize import Int8Linear, weights_of
from registry import resolve


# ---------------------------------------------------------------------------------------
# speed

def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, spread = max - min) of fn's wall time over `repeats` runs, on the default device
    (bench.py --device): synchronized before and after, so queued work is billed to the run that queued it."""
    times, device = [], torch.get_default_device()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write) on the default device, the decode step's limit."""
    src = torch.ones(256 * 2**20)  # 1 GiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the pages are mapped before the timed copies
    seconds, _ = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / seconds


def gemm_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of a large square matmul in `dtype` on the default device: the ceiling of a prefill."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: the BLAS picks and packs its kernels
    seconds, _ = median_seconds(lambda: a @ b, 5)
    return 2 * n**3 / seconds


def prefill_flops(args, n_tokens: int) -> float:
    """Matmul FLOPs of a prefill of one prompt: every projection and MLP for every token, causal
    attention (QK^T and PV over the T^2 / 2 pairs that are not masked), the head for the last token."""
    per_token = (args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim  # q, k, v
                 + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.ffn_dim)  # o, gate/up/down
    attention = 2 * (n_tokens**2 / 2) * args.n_heads * args.head_dim  # two matmuls of n^2/2 dot products
    return 2 * args.n_layers * (n_tokens * per_token + attention) + 2 * args.dim * args.vocab_size


def rss_mib() -> float:
    """Resident memory of this process now (Linux; NaN elsewhere). ru_maxrss only gives the peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def load_transformers(checkpoint: str | None, dtype: torch.dtype):
    """transformers' own model of the same checkpoint, or None when it is not installed (the test extra)."""
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve(checkpoint), dtype=dtype)
    hf = hf.to(torch.get_default_device()).eval()
    eos = hf.generation_config.eos_token_id
    hf.generation_config.pad_token_id = eos[0] if isinstance(eos, list) else eos  # silences its warning
    return hf


def transformers_decode_seconds(hf, tokens: torch.Tensor, n_steps: int) -> float:
    """Seconds per decode step of transformers' `generate` (greedy, its default cache and
    attention) on `tokens` [1, T]: (time of 1 + n_steps new tokens - time of 1) / n_steps, medians of 2."""
    mask = torch.ones_like(tokens)
    run = lambda n: hf.generate(tokens, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    prefill_s, _ = median_seconds(lambda: run(1), 2)
    total_s, _ = median_seconds(lambda: run(1 + n_steps), 2)
    return (total_s - prefill_s) / n_steps


COMPILE_PROBE = [sys.executable, "generate.py", "--compile", "--max-new-tokens", "4", "--prompt", "Hello"]


def compile_start_seconds(checkpoint: str | None, dtype: torch.dtype, weights: str) -> dict:
    """Wall time of a whole `generate.py --compile` run in a fresh process with an empty compile
    cache, then again with that cache (the cached start), and without --compile."""
    def wall(args, cache_dir):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        command = [*args, "--dtype", str(dtype).removeprefix("torch."), "--weights", weights,
                   "--device", str(torch.get_default_device()),
                   *(["--checkpoint", checkpoint] if checkpoint else [])]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, cwd=Path(__file__).parent.parent)
        return time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = wall(COMPILE_PROBE, cache_dir)
        cached = wall(COMPILE_PROBE, cache_dir)
        eager = wall([a for a in COMPILE_PROBE if a != "--compile"], cache_dir)
    return {"cold_start_s": cold, "cached_start_s": cached, "eager_start_s": eager}


def step_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter (tied ones once) and every int8 layer's
    weight and scales, less an embedding that is not the LM head (a step reads one row of it)."""
    tensors = {id(t): t for m in model.modules() for t in [*m.parameters(recurse=False),
                                                            *(m.buffers(recurse=False) if isinstance(m, Int8Linear) else [])]}
    if model.lm_head.weight is not model.embed_tokens.weight:
        tensors.pop(id(model.embed_tokens.weight))
    return sum(t.numel() * t.element_size() for t in tensors.values())


SPEED_CONFIGS = {"full": CompressionConfig(method="full"), "chunkkv": CompressionConfig(keep=0.1),
                 "chunkkv-reuse2": CompressionConfig(keep=0.1, reuse=2),
                 "snapkv": CompressionConfig(method="snapkv", keep=0.1)}


def run_speed(model, tokenizer, quick: bool, lengths=None, methods=None, batches=None, compiled=True,
              checkpoint: str | None = None, compare: bool = True, llama_bench: str | None = None) -> list[dict]:
    """Prefill (against the GEMM peak), compression, and eager / compiled decode (against the
    bandwidth roofline) per length, method and batch; with `compare`, transformers' `generate` on
    the same prompt (full cache, batch 1) and the start time of a compiled run in a fresh process;
    with a `llama_bench` binary, llama.cpp on the same weights after each length's chunkkv runs."""
    with tempfile.TemporaryDirectory() as folder:
        llama_files = llama_cpp.write_files(model, tokenizer, Path(folder)) if llama_bench else {}
        return speed_rows(model, tokenizer, quick, lengths, methods, batches, compiled, checkpoint, compare,
                          llama_bench, llama_files)


def speed_rows(model, tokenizer, quick, lengths, methods, batches, compiled, checkpoint, compare, llama_bench,
               llama_files) -> list[dict]:
    torch._dynamo.config.cache_size_limit = 64  # one graph per cache size; many sizes in one run
    torch._dynamo.config.automatic_dynamic_shapes = False  # only the cache slots dynamic, as in a CLI run
    lengths = lengths or ([512] if quick else [1024, 2048, 4096, 8000])
    batches = batches or ([1] if quick else [1, 4])
    n_steps = 8 if quick else 16
    configs = {label: SPEED_CONFIGS[label] for label in methods or (["full", "chunkkv"] if quick else SPEED_CONFIGS)}
    paragraphs = stdlib_paragraphs()
    dtype, weights = model.embed_tokens.weight.dtype, weights_of(model)
    bandwidth, peak = memory_bandwidth(), gemm_peak(dtype)
    weight_bytes = step_weight_bytes(model)
    rows = [{"bench": "speed", "metric": "memory_bandwidth_gb_s", "value": bandwidth / 1e9},
            {"bench": "speed", "metric": "gemm_peak_gflop_s", "value": peak / 1e9}]
    modes = [("eager", model.decode)] + ([("compiled", compile_decode(model))] if compiled else [])
    hf = load_transformers(checkpoint, dtype) if compare else None
    progress = Progress(len(lengths) * len(configs) * len(batches), "speed")
    for n_tokens in lengths:
        ids = tokenizer.encode("\n".join(take_prose(paragraphs, tokenizer, n_tokens, 0))).ids[:n_tokens]
        tokens = torch.tensor([ids])
        repeats = 1 if n_tokens > 8192 else 2 if n_tokens > 4096 else 3
        last = [None]  # the last timed prefill's capture serves the compressions below
        prefill_s, prefill_spread = median_seconds(lambda: last.__setitem__(0, model.capture(tokens)), repeats)
        captured = last[0][1]
        rows.append({"bench": "speed", "prompt_tokens": n_tokens, "metric": "prefill_seconds", "value": prefill_s,
                     "spread": prefill_spread, "of_gemm_peak": prefill_flops(model.args, n_tokens) / prefill_s / peak})
        if hf is not None:
            hf_step = transformers_decode_seconds(hf, tokens, n_steps)
            rows.append({"bench": "speed", "method": "transformers", "keep": 1.0, "prompt_tokens": n_tokens, "batch": 1,
                         "metric": "decode_tokens_per_s", "value": 1 / hf_step, "step_ms": 1000 * hf_step})
        for label, config in configs.items():
            seconds = [compress(model, captured, tokens, config, 64) for _ in range(5)]
            common = {"bench": "speed", "method": label, "keep": 0.1 if label != "full" else 1.0, "prompt_tokens": n_tokens}
            rows.append({**common, "metric": "compress_seconds", "value": statistics.median(seconds),
                         "spread": max(seconds) - min(seconds), "share_of_prefill": statistics.median(seconds) / prefill_s})
            for n_batch in batches:
                # decode speed does not depend on content: batch rows are copies of the one prompt
                compress(model, replicated(captured, n_batch), tokens.expand(n_batch, -1), config, 64)
                kv_bytes = model.cache_bytes()
                torch._dynamo.reset()  # each size compiles anew (first_step_s); frees frozen weights of batches > 1
                for mode, decode in modes:
                    rss_before = rss_mib()
                    times, warmup = decode_step_seconds(model, n_batch, n_steps + 1, decode)
                    step_s, spread = statistics.median(times), max(times) - min(times)
                    roofline_s = (weight_bytes + kv_bytes) / bandwidth
                    rows.append({**common, "batch": n_batch, "mode": mode, "metric": "decode_tokens_per_s",
                                 "value": n_batch / step_s, "step_ms": 1000 * step_s, "spread_ms": 1000 * spread,
                                 "roofline_ms": 1000 * roofline_s, "of_roofline": roofline_s / step_s,
                                 "first_step_s": sum(warmup), "rss_added_mib": rss_mib() - rss_before})
                rows.append({**common, "batch": n_batch, "metric": "kv_cache_bytes", "value": kv_bytes,
                             "kept_per_layer": statistics.mean(kept_per_layer(model, n_tokens))})
                rows.append({**common, "batch": n_batch, "metric": "peak_rss_mib_so_far",
                             "value": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                progress.step(f"{n_tokens} tokens, {label}, batch {n_batch}")
        for precision, path in llama_files.items():  # the same depth, new tokens and threads, right after chunkkv's
            rows.append({"bench": "speed", "method": "llama.cpp", "precision": precision, "prompt_tokens": n_tokens,
                         "batch": 1, "metric": "llama_cpp",
                         **llama_cpp.llama_bench(llama_bench, path, n_tokens, n_steps, torch.get_num_threads())})
    if compare and compiled and not quick:  # two more compiles in fresh processes: minutes
        start = compile_start_seconds(checkpoint, dtype, weights)
        rows.append({"bench": "speed", "metric": "start_seconds", "value": start["cached_start_s"], **start})
    return rows


def speed_tables(rows: list[dict]) -> str:
    bandwidth = next(r["value"] for r in rows if r["metric"] == "memory_bandwidth_gb_s")
    peak = next(r["value"] for r in rows if r["metric"] == "gemm_peak_gflop_s")
    lengths = sorted({r["prompt_tokens"] for r in rows if "prompt_tokens" in r})
    labels = [label for label in SPEED_CONFIGS if any(r.get("method") == label for r in rows)]
    squeezed = [label for label in labels if label != "full"]
    find = lambda **m: next((r for r in rows if all(r.get(k) == v for k, v in m.items())), None)  # noqa: E731
    prefill = []
    for n in lengths:
        p = find(prompt_tokens=n, metric="prefill_seconds")
        line = [n, f"{p['value']:.2f} ± {p['spread']:.2f}", f"{100 * p['of_gemm_peak']:.0f} %"]
        for label in squeezed:
            c = find(prompt_tokens=n, method=label, metric="compress_seconds")
            line.append(f"{1000 * c['value']:.1f} ({100 * c['share_of_prefill']:.1f} %)")
        if {"chunkkv", "chunkkv-reuse2"} <= set(squeezed):
            c1, c2 = (find(prompt_tokens=n, method=m, metric="compress_seconds") for m in ("chunkkv", "chunkkv-reuse2"))
            line.append(f"{100 * (1 - c2['value'] / c1['value']):.0f} %")
        prefill.append(line)
    reuse = ["reuse 2 saves"] if {"chunkkv", "chunkkv-reuse2"} <= set(squeezed) else []
    out = [table(f"Prefill and compression (compression = scoring + selection + gather, all layers; median; "
                 f"GEMM peak {peak:.0f} GFLOP/s measured)",
                 ["prompt", "prefill s", "of GEMM peak"] + [f"{label} ms" for label in squeezed] + reuse, prefill)]
    decode = []
    for n in lengths:
        hf = find(prompt_tokens=n, method="transformers")
        for label in labels:
            for n_batch in sorted({r.get("batch") for r in rows if r.get("batch")}):
                e = find(prompt_tokens=n, method=label, batch=n_batch, mode="eager")
                c = find(prompt_tokens=n, method=label, batch=n_batch, mode="compiled")
                kv = find(prompt_tokens=n, method=label, batch=n_batch, metric="kv_cache_bytes")
                best = c or e  # the compiled step where it ran
                vs_hf = f"{best['value'] / hf['value']:.2f}x" if hf and n_batch == 1 else "-"
                decode.append([n, label, n_batch, f"{e['value']:.1f}", f"{c['value']:.1f}" if c else "-",
                               f"{hf['value']:.1f}" if hf and n_batch == 1 else "-", vs_hf,
                               f"{kv['value'] / 2**20:.1f}", f"{best['roofline_ms']:.1f}",
                               f"{best['step_ms']:.1f} ± {best['spread_ms']:.1f}", f"{100 * best['of_roofline']:.0f} %"])
    out.append(table(f"Decode (tokens/s; roofline = (weights + KV cache) / {bandwidth:.1f} GB/s measured copy bandwidth; "
                     "transformers = its generate, full cache, same prompt, dtype and threads)",
                     ["prompt", "method", "batch", "eager tok/s", "compiled tok/s", "transformers tok/s",
                      "best / transformers", "KV MiB", "roofline ms", "step ms (compiled if run)", "of roofline"], decode))
    if any(r.get("method") == "llama.cpp" for r in rows):
        out.append(llama_cpp_table(rows))
    compiled = [r for r in rows if r.get("mode") == "compiled"]
    if compiled:
        out.append(f"\ncompiling a decode graph (first step): {min(r['first_step_s'] for r in compiled):.0f}-"
                   f"{max(r['first_step_s'] for r in compiled):.0f} s; resident memory it adds: "
                   f"{statistics.median(r['rss_added_mib'] for r in compiled):.0f} MiB (median)")
    start = find(metric="start_seconds")
    if start:
        out.append(f"generate.py --compile, whole run in a fresh process: {start['cold_start_s']:.0f} s with an empty "
                   f"compile cache, {start['cached_start_s']:.0f} s cached; {start['eager_start_s']:.0f} s without --compile")
    peak_rss = max(r["value"] for r in rows if r["metric"] == "peak_rss_mib_so_far")
    out.append(f"\npeak process memory (RSS) over the whole run: {peak_rss:.0f} MiB")
    return "\n".join(out)


def llama_cpp_table(rows: list[dict]) -> str:
    """chunkkv's full-cache batch-1 decode (compiled where it ran) and prefill beside llama-bench's."""
    find = lambda **m: next((r for r in rows if all(r.get(k) == v for k, v in m.items())), None)  # noqa: E731
    lines = []
    for r in (r for r in rows if r.get("method") == "llama.cpp"):
        n = r["prompt_tokens"]
        ours = find(prompt_tokens=n, method="full", batch=1, mode="compiled") or \
            find(prompt_tokens=n, method="full", batch=1, mode="eager")
        prefill = n / find(prompt_tokens=n, metric="prefill_seconds")["value"]
        lines.append([n, r["precision"], f"{ours['value']:.1f} {ours['mode']}" if ours else "-",
                      f"{r['decode_tokens_per_s']:.1f} ± {r['decode_stddev']:.1f}",
                      f"{ours['value'] / r['decode_tokens_per_s']:.2f}x" if ours else "-", f"{prefill:.0f}",
                      f"{r['prefill_tokens_per_s']:.0f} ± {r['prefill_stddev']:.0f}",
                      f"{prefill / r['prefill_tokens_per_s']:.2f}x"])
    return table("chunkkv beside llama.cpp (llama-bench on the same weights written as GGUF, run right after "
                 "chunkkv at each length: batch 1, full cache, the same context depth, new tokens and threads)",
                 ["prompt", "llama.cpp weights", "chunkkv decode tok/s", "llama.cpp decode tok/s", "chunkkv / llama.cpp",
                  "chunkkv prefill tok/s", "llama.cpp prefill tok/s", "chunkkv / llama.cpp"], lines)


# ---------------------------------------------------------------------------------------
# throughput at equal memory: a smaller cache lets more sequences decode at once

THROUGHPUT_CONFIGS = {"full": CompressionConfig(method="full"), "chunkkv": CompressionConfig(keep=0.1),
                      "chunkkv-reuse2": CompressionConfig(keep=0.1, reuse=2)}


def run_throughput(model, tokenizer, quick: bool, memory_gib: float = 1.0, lengths=None) -> list[dict]:
    """Decode tokens/s (i) at a fixed KV-cache memory: the largest batch of `long`-token prompts
    whose caches fit, per method; (ii) against batch size at `short` tokens (lengths = [long,
    short]). Eager decode; the configurations take turns within each repeat (a shared machine's
    load hits them alike)."""
    long, short = lengths or ((512, 256) if quick else (8000, 4096))
    n_new = 16 if quick else 64
    batches = [1, 2] if quick else [1, 2, 4, 8, 16]
    repeats, n_steps = (2, 2) if quick else (2, 3)  # the batch sweep runs one repeat: 10 configurations already
    memory = int((memory_gib / 16 if quick else memory_gib) * 2**30)
    paragraphs = stdlib_paragraphs()
    prompt = lambda n: torch.tensor([tokenizer.encode("\n".join(take_prose(paragraphs, tokenizer, n, 0))).ids[:n]])  # noqa: E731
    rows, progress = [], Progress(2 + repeats * len(THROUGHPUT_CONFIGS) + 2 * len(batches), "throughput")

    def measure(label, config, captured, tokens, n_batch, **fields):
        seconds = compress(model, replicated(captured, n_batch), tokens.expand(n_batch, -1), config, n_new)
        times = decode_step_seconds(model, n_batch, n_steps + 1)[0][1:]  # eager, but its first step allocates
        rows.append({"bench": "throughput", "method": label, "batch": n_batch, "prompt_tokens": tokens.shape[1],
                     "metric": "decode_step_seconds", "values": times, "kv_cache_bytes": model.cache_bytes(),
                     "compress_seconds_batch": seconds, "load_average_1min": os.getloadavg()[0],
                     **fields})
        progress.step(f"{tokens.shape[1]} tokens, {label}, batch {n_batch}")

    # (i) equal memory: each method's largest batch, from the cache size of one row
    tokens, captures = prompt(long), []
    prefill_s, _ = median_seconds(lambda: captures.append(model.capture(tokens)[1]), 1)
    captured = captures.pop()
    rows.append({"bench": "throughput", "prompt_tokens": long, "metric": "prefill_seconds",
                 "value": prefill_s, "load_average_1min": os.getloadavg()[0]})
    progress.step(f"prefill {long}")
    fits = {}
    for label, config in THROUGHPUT_CONFIGS.items():
        seconds = compress(model, captured, tokens, config, n_new)
        fits[label] = memory // model.cache_bytes()
        rows.append({"bench": "throughput", "method": label, "prompt_tokens": long, "metric": "max_batch",
                     "value": fits[label], "memory_bytes": memory, "row_bytes": model.cache_bytes(),
                     "compress_seconds": seconds})
    for _ in range(repeats):
        for label, config in THROUGHPUT_CONFIGS.items():
            measure(label, config, captured, tokens, fits[label], setting="equal_memory", memory_bytes=memory)
    del captured

    # (ii) tokens/s against batch size
    tokens = prompt(short)
    _, captured = model.capture(tokens)
    progress.step(f"prefill {short}")
    for n_batch in batches:
        for label in ("full", "chunkkv"):
            measure(label, THROUGHPUT_CONFIGS[label], captured, tokens, n_batch, setting="batch_sweep")
    return rows


def throughput_tables(rows: list[dict]) -> str:
    steps = [r for r in rows if r["metric"] == "decode_step_seconds"]
    load = statistics.median(r["load_average_1min"] for r in steps)

    def speed(setting, **match):
        times = [t for r in steps if r["setting"] == setting and all(r[k] == v for k, v in match.items()) for t in r["values"]]
        return statistics.median(times), len(times)

    out, equal, tokens_per_s = [], [], {}
    for r in (r for r in rows if r["metric"] == "max_batch"):
        step, n = speed("equal_memory", method=r["method"])
        tokens_per_s[r["method"]] = r["value"] / step
        equal.append([r["method"], r["prompt_tokens"], f"{r['row_bytes'] / 2**20:.1f}", r["value"],
                      f"{r['value'] * r['row_bytes'] / 2**20:.0f}", f"{1000 * step:.0f}",
                      f"{tokens_per_s[r['method']]:.2f}", n])
    equal = [e + [f"{tokens_per_s[e[0]] / tokens_per_s['full']:.1f}x"] for e in equal]
    memory = next(r["memory_bytes"] for r in rows if r["metric"] == "max_batch") / 2**30
    out.append(table(f"Throughput at equal KV-cache memory ({memory:g} GiB), eager decode, median step "
                     f"(load average {load:.1f})",
                     ["method", "prompt", "MiB per row", "max batch", "cache MiB", "step ms", "tokens/s", "steps",
                      "vs full"], equal))
    sweep = []
    for n_batch in sorted({r["batch"] for r in steps if r["setting"] == "batch_sweep"}):
        cells = [n_batch]
        for label in ("full", "chunkkv"):
            step, n = speed("batch_sweep", method=label, batch=n_batch)
            cells += [f"{1000 * step:.0f}", f"{n_batch / step:.2f}"]
        sweep.append(cells)
    n_tokens = next(r["prompt_tokens"] for r in steps if r["setting"] == "batch_sweep")
    out.append(table(f"Decode tokens/s against batch size, {n_tokens}-token prompts (chunkkv keep 0.1)",
                     ["batch", "full step ms", "full tok/s", "chunkkv step ms", "chunkkv tok/s"], sweep))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# k questions about one document

def run_questions(model, tokenizer, quick: bool, lengths=None, n_questions=None, checkpoint=None) -> list[dict]:
    """Seconds to answer the first k questions about one document: aware = k prefills of
    document + question, each compressed; agnostic = one prefill and compression of the
    document, then per question a restore, an extend and the answer; saved = that compressed
    context saved to a file (contexts.save_context), then loaded in a fresh process that answers
    the same questions. Every answer is 8 greedy tokens (no stop), so all decode the same amount."""
    return [row for n_tokens in lengths or ([1024] if quick else [4096])
            for row in questions_at(model, tokenizer, n_tokens, n_questions or (2 if quick else 16), checkpoint)]


SAVED_PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
from contexts import load_context
from generate import answer
from registry import load
torch.set_grad_enabled(False)
model, tokenizer = load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), weights=sys.argv[6])
loaded = time.perf_counter()
context = load_context(sys.argv[3], model, tokenizer)
out = {"model_load_seconds": loaded - start, "cache_load_seconds": time.perf_counter() - loaded, "answers": []}
for ids in json.loads(sys.argv[4]):
    begin = time.perf_counter()
    record = answer(model, context, torch.tensor([ids]), int(sys.argv[5]))
    out["answers"].append([time.perf_counter() - begin, record.extend_seconds])  # the extend gives the first token
print(json.dumps(out))
"""


def saved_answers(model, tokenizer, context, checkpoint, questions: list[torch.Tensor], n_answer: int) -> dict:
    """SAVED_PROBE's times: `context` saved to a temporary file, then loaded (after the checkpoint, timed
    apart, imports included) and asked the questions in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "context.kv"
        file_bytes = save_context(path, model, tokenizer, context)
        args = [str(resolve(checkpoint)), str(model.embed_tokens.weight.dtype).removeprefix("torch."), str(path),
                json.dumps([q[0].tolist() for q in questions]), str(n_answer), weights_of(model)]
        result = subprocess.run([sys.executable, "-c", SAVED_PROBE, *args], capture_output=True, text=True,
                                cwd=Path(__file__).parent.parent)
    if result.returncode != 0:
        raise RuntimeError(f"answering from the saved context failed: {result.stderr.strip().splitlines()[-1]}")
    return {**json.loads(result.stdout), "file_bytes": file_bytes}


def questions_at(model, tokenizer, n_tokens: int, n_questions: int, checkpoint=None) -> list[dict]:
    n_answer = 8
    ids = tokenizer.encode("\n".join(take_prose(stdlib_paragraphs(), tokenizer, n_tokens, 0))).ids[:n_tokens]
    document = torch.tensor([ids])
    questions = [torch.tensor([tokenizer.encode(f"\nWhat is the special magic number for {KEYS[i % len(KEYS)]} "
                                                f"number {i}? The special magic number is",
                                                add_special_tokens=False).ids])
                 for i in range(n_questions)]
    room = max(q.shape[1] for q in questions) + n_answer
    configs = {"full": CompressionConfig(method="full"), "chunkkv": CompressionConfig(keep=0.1)}
    runs = [("chunkkv", "aware"), ("chunkkv", "agnostic"), ("full", "agnostic")]  # aware full: the same k prefills
    generate(model, document[:, :256], CompressionConfig(method="full"), 2)  # warm-up: first-call allocations
    # each run has its own copy of the model (its own caches), so the runs can take turns question
    # by question: a change in the machine's load hits all of them alike
    models = {run: copy.deepcopy(model) for run in runs}
    seconds, contexts = {run: [] for run in runs}, {}
    for run in runs:
        if run[1] == "agnostic":  # the one prefill + compression, counted in every k
            start = time.perf_counter()
            contexts[run] = compress_context(models[run], document, configs[run[0]], room)
            seconds[run].append(time.perf_counter() - start)
    progress = Progress(n_questions, "questions")
    for i, question in enumerate(questions):
        for run in runs:
            start = time.perf_counter()
            if run[1] == "aware":
                generate(models[run], torch.cat([document, question], 1), configs[run[0]], n_answer)
            else:
                answer(models[run], contexts[run], question, n_answer)
            seconds[run].append(time.perf_counter() - start)
        progress.step(f"question {i + 1}")
    rows, ks = [], sorted({k for k in (1, 4, 16) if k <= n_questions} | {n_questions})  # the k of each row
    for (label, setting), times in seconds.items():
        once = times[0] if setting == "agnostic" else 0.0
        per_question = times[1:] if setting == "agnostic" else times
        for k in ks:
            rows.append({"bench": "questions", "setting": setting, "method": label, "keep": 0.1 if label != "full" else 1.0,
                         "prompt_tokens": n_tokens, "k": k, "answer_tokens": n_answer, "metric": "seconds",
                         "value": once + sum(per_question[:k]), "compress_once_seconds": once})
    if model.embed_tokens.weight.device.type == "cpu":  # the fresh process loads on the CPU
        saved = saved_answers(models[("chunkkv", "agnostic")], tokenizer, contexts[("chunkkv", "agnostic")],
                              checkpoint, questions, n_answer)
        once = saved["cache_load_seconds"]
        for k in ks:
            rows.append({"bench": "questions", "setting": "saved", "method": "chunkkv", "keep": 0.1,
                         "prompt_tokens": n_tokens, "k": k, "answer_tokens": n_answer, "metric": "seconds",
                         "value": once + sum(seconds for seconds, _ in saved["answers"][:k]),
                         "compress_once_seconds": once, "model_load_seconds": saved["model_load_seconds"],
                         "first_token_seconds": once + saved["answers"][0][1], "file_bytes": saved["file_bytes"]})
    return rows


def questions_table(rows: list[dict]) -> str:
    find = lambda **m: next(r for r in rows if all(r.get(k) == v for k, v in m.items()))  # noqa: E731
    cells, saved = [], any(r["setting"] == "saved" for r in rows)
    for n in sorted({r["prompt_tokens"] for r in rows}):
        for k in sorted({r["k"] for r in rows if r["prompt_tokens"] == n}):
            aware, agnostic = (find(method="chunkkv", setting=s, k=k, prompt_tokens=n) for s in ("aware", "agnostic"))
            full = find(method="full", setting="agnostic", k=k, prompt_tokens=n)
            cells.append([n, k, f"{aware['value']:.1f}",
                          f"{agnostic['value']:.1f} (once: {agnostic['compress_once_seconds']:.1f})",
                          f"{aware['value'] / agnostic['value']:.1f}x",
                          f"{full['value']:.1f} (once: {full['compress_once_seconds']:.1f})"])
            if saved:
                row = find(setting="saved", k=k, prompt_tokens=n)
                cells[-1] += [f"{row['value']:.2f} (load: {row['compress_once_seconds']:.2f})",
                              f"{row['first_token_seconds']:.2f}", f"{row['model_load_seconds']:.1f}"]
    return table(f"Seconds to answer the first k questions about one document ({rows[0]['answer_tokens']} "
                 f"answer tokens each; once = the one prefill + compression)",
                 ["document tokens", "k", "chunkkv 0.1 aware: k prefills", "chunkkv 0.1 agnostic: 1 prefill + k extends",
                  "speed-up", "full cache agnostic"] +
                 (["saved, fresh process: cache load + k answers", "cache load + first token", "model load"]
                  if saved else []), cells)


# ---------------------------------------------------------------------------------------
# load: what loading a checkpoint costs in memory

LOAD_PROBE = """
import resource, sys, time, torch, checkpoint
mib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
base, start = mib(), time.perf_counter()
model, _ = checkpoint.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds, loaded = time.perf_counter() - start, mib()
with torch.no_grad():
    model(torch.zeros(1, 1, dtype=torch.long))  # one forward: every weight is read, so resident
print(base, loaded, mib(), seconds)
"""


def run_load(path: Path, dtypes=("float32", "bfloat16")) -> list[dict]:
    """Peak RSS of `checkpoint.load(path, dtype)`, each dtype in a fresh process (a process's peak
    only grows): after loading, and after one forward pass, which makes every weight resident
    (float32 safetensors load as views of the memory-mapped file until then)."""
    files = [path] if path.is_file() else [*path.glob("*.safetensors")]
    size_mib = sum(f.stat().st_size for f in files) / 2 ** 20
    rows = []
    for dtype in dtypes:
        result = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(path), dtype], capture_output=True, text=True,
                                cwd=Path(__file__).parent.parent)
        if result.returncode != 0:
            raise RuntimeError(f"loading {path} in {dtype} failed: {result.stderr.strip().splitlines()[-1]}")
        base, loaded, forward, seconds = map(float, result.stdout.split())
        rows.append({"bench": "load", "checkpoint": str(path), "dtype": dtype, "file_mib": size_mib,
                     "base_rss_mib": base, "peak_rss_loaded_mib": loaded, "peak_rss_forward_mib": forward,
                     "load_seconds": seconds})
    return rows


def load_table(rows: list[dict]) -> str:
    return table(f"Loading {rows[0]['checkpoint']} ({rows[0]['file_mib']:.0f} MiB of weight files); peak RSS, "
                 "MiB, of a fresh process", ["dtype", "before", "after load", "after one forward", "load s"],
                 [[r["dtype"], f"{r['base_rss_mib']:.0f}", f"{r['peak_rss_loaded_mib']:.0f}",
                   f"{r['peak_rss_forward_mib']:.0f}", f"{r['load_seconds']:.1f}"] for r in rows])
