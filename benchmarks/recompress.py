"""The re-compression benchmark (python bench.py recompress): long generation through a cache
compressed again whenever full, its fidelity, its recall of an early fact and its decode speed.
One job, so its speed part stays here rather than in bench_speed.py."""
import math
import random
import statistics
import sys
import time

import torch

from benchmarks.common import INTRO, KEYS, Progress, stdlib_paragraphs, table, take_prose, wilson
from chunkkv import CompressionConfig
from generate import Recompression, decode_tokens, extend_all, generate, prefill_and_compress


# ---------------------------------------------------------------------------------------
# recompress: long generation through a cache that is compressed again whenever full

RECOMPRESS_METHODS = {"chunkkv": dict(method="chunkkv"), "snapkv": dict(method="snapkv"),
                      "streaming": dict(method="streaming")}


def block_bootstrap(values: list[list[float]], stat, block: int = 64, n_resamples: int = 1000, seed: int = 0):
    """95 % interval of stat(tokens) by resampling blocks of `block` consecutive tokens (of all
    texts) with replacement: neighbouring tokens are not independent, blocks roughly are."""
    blocks = [text[i:i + block] for text in values for i in range(0, len(text), block)]
    rng = random.Random(seed)
    stats = sorted(stat([x for b in rng.choices(blocks, k=len(blocks)) for x in b]) for _ in range(n_resamples))
    return stats[int(0.025 * n_resamples)], stats[int(0.975 * n_resamples) - 1]


def through_recompression(model, prompt: torch.Tensor, continuation: torch.Tensor, config: CompressionConfig,
                          cache_budget: int) -> tuple[torch.Tensor, Recompression]:
    """Logits [1 + n, vocab] after the prompt and after each continuation token, appended through
    a cache of `cache_budget` entries re-compressed whenever full (extend_all = one by one)."""
    recompression = Recompression(config, cache_budget)
    first, _ = prefill_and_compress(model, prompt, [prompt.shape[1]], config, continuation.shape[1],
                                    recompression=recompression)
    rest = extend_all(model, continuation, recompression)
    return torch.cat([first[:, None], rest], 1)[0], recompression


def run_recompress(model, tokenizer, quick: bool, caps=None, parts=("fidelity", "retrieval", "speed"),
                   n_texts: int | None = None, n_cases: int | None = None, n_new: int | None = None) -> list[dict]:
    """Fidelity (perplexity and KL to the full cache, teacher-forced), retrieval of an early fact
    after many re-compressions, and decode speed, for caches capped at `caps` entries that keep
    3/4 of the cap after each re-compression. Plain completion format; the fact is asked after
    compression (query-agnostic)."""
    paragraphs, caps = stdlib_paragraphs(), tuple(caps or (256, 512))
    n_texts, n_prompt, n_forced = n_texts or (1 if quick else 3), 256, 512 if quick else 2048
    rows = []
    if "fidelity" in parts:
        progress = Progress(n_texts * (1 + len(caps) * len(RECOMPRESS_METHODS)), "fidelity")
        nll, kl = {}, {}
        for t in range(n_texts):
            text = "\n".join(take_prose(paragraphs, tokenizer, n_prompt + n_forced + 50, 400 * t + 7))
            ids = torch.tensor([tokenizer.encode(text).ids[:n_prompt + n_forced]])
            targets = ids[0, n_prompt:]
            full = model(ids)[0, n_prompt - 1:-1].float().log_softmax(-1)  # predictions of the continuation
            nll.setdefault(("full", 0), []).append((-full.gather(1, targets[:, None])[:, 0]).tolist())
            progress.step(f"text {t}, full")
            for cap in caps:
                for label, kwargs in RECOMPRESS_METHODS.items():
                    logits, recompression = through_recompression(model, ids[:, :n_prompt], ids[:, n_prompt:-1],
                                                                  CompressionConfig(**kwargs), cap)
                    logp = logits.float().log_softmax(-1)
                    nll.setdefault((label, cap), []).append((-logp.gather(1, targets[:, None])[:, 0]).tolist())
                    kl.setdefault((label, cap), []).append((full.exp() * (full - logp)).sum(-1).tolist())
                    rows.append({"bench": "recompress", "part": "fidelity", "method": label, "cache_budget": cap,
                                 "text": t, "recompressions": recompression.count,
                                 "recompress_seconds": recompression.seconds})
                    progress.step(f"text {t}, {label}, cap {cap}: {recompression.count} re-compressions")
        ppl = lambda xs: math.exp(statistics.mean(xs))  # noqa: E731
        for (label, cap), values in nll.items():
            flat = [x for text in values for x in text]
            row = {"bench": "recompress", "part": "fidelity", "method": label, "cache_budget": cap or None,
                   "texts": len(values), "tokens": len(flat), "perplexity": ppl(flat),
                   "perplexity_ci95": block_bootstrap(values, ppl), "interval": "block bootstrap, 64-token blocks"}
            if (label, cap) in kl:
                row.update(kl=statistics.mean(x for text in kl[(label, cap)] for x in text),
                           kl_ci95=block_bootstrap(kl[(label, cap)], statistics.mean))
            rows.append(row)
    if "retrieval" in parts:
        rows += recompress_retrieval(model, tokenizer, paragraphs, caps, n_cases or (2 if quick else 8))
    if "speed" in parts:
        rows += recompress_speed(model, tokenizer, paragraphs, n_new or (256 if quick else 1024))
    return rows


def recompress_retrieval(model, tokenizer, paragraphs, caps, n_cases: int, n_tokens: int = 1500) -> list[dict]:
    """A magic number stated in the first sentences, ~n_tokens of prose after it, then the
    question: is it recalled after the cache was re-compressed several times?"""
    rows, progress = [], Progress(n_cases * (1 + len(caps) * len(RECOMPRESS_METHODS)), "retrieval")
    for case in range(n_cases):
        rng = random.Random(case)
        key, value = rng.choice(KEYS), str(rng.randint(100000, 999999))
        prose = "\n".join(take_prose(paragraphs, tokenizer, n_tokens, rng.randrange(len(paragraphs))))
        fact = INTRO + f"One of the special magic numbers for {key} is: {value}.\n"
        question = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                    f"The special magic number for {key} mentioned in the provided text is")
        prompt = torch.tensor([tokenizer.encode(fact).ids])
        rest = torch.tensor([tokenizer.encode(prose + question).ids])
        stop = set(tokenizer.encode("\n").ids)
        runs = [("full", None)] + [(label, cap) for cap in caps for label in RECOMPRESS_METHODS]
        for label, cap in runs:
            if cap is None:
                ids = torch.cat([prompt, rest], 1)
                logits, _ = prefill_and_compress(model, ids, [ids.shape[1]], CompressionConfig(method="full"), 12)
                recompression = None
            else:
                all_logits, recompression = through_recompression(model, prompt, rest, CompressionConfig(
                    **RECOMPRESS_METHODS[label]), cap)
                logits = all_logits[-1:]
            # greedy; the cache is re-compressed when full, as in generate
            tokens = decode_tokens(model, logits, 10, stop_tokens=tuple(stop), recompression=recompression)[0]
            found = value in tokenizer.decode(tokens[0].tolist())
            rows.append({"bench": "recompress", "part": "retrieval", "method": label, "cache_budget": cap,
                         "case": case, "context_tokens": prompt.shape[1] + rest.shape[1], "found": found,
                         "recompressions": recompression.count if recompression else 0})
            progress.step(f"case {case}, {label}, cap {cap}: {'found' if found else 'missed'}")
    return rows


def recompress_speed(model, tokenizer, paragraphs, n_new: int, rounds: int = 2) -> list[dict]:
    """Decode tokens/s (eager) over an n_new-token greedy generation after a 256-token prompt:
    full cache vs a 512-entry cache re-compressed when full, and the share re-compressing takes.
    The configurations take turns for `rounds` rounds (a shared machine's load hits them alike)."""
    ids = torch.tensor([tokenizer.encode("\n".join(take_prose(paragraphs, tokenizer, 300, 11))).ids[:256]])
    runs = {"full": (CompressionConfig(method="full"), None), "chunkkv": (CompressionConfig(), 512),
            "snapkv": (CompressionConfig(method="snapkv"), 512), "streaming": (CompressionConfig(method="streaming"), 512)}
    rows = []
    for round_ in range(rounds):
        for label, (config, cap) in runs.items():
            start = time.perf_counter()
            record = generate(model, ids, config, n_new, cache_budget=cap)
            total = time.perf_counter() - start - record.prefill.prefill_seconds
            steps = record.step_seconds
            rows.append({"bench": "recompress", "part": "speed", "method": label, "cache_budget": cap, "round": round_,
                         "prompt_tokens": 256, "new_tokens": record.tokens.shape[1],
                         "decode_tokens_per_s": len(steps) / total, "step_ms_median": 1000 * statistics.median(steps),
                         "recompressions": record.recompressions, "recompress_seconds": record.recompress_seconds,
                         "recompress_share": record.recompress_seconds / total, "mode": "eager"})
            print(f"  [speed] round {round_ + 1}/{rounds}, {label}: {rows[-1]['decode_tokens_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
    return rows


def recompress_tables(rows: list[dict]) -> str:
    out = []
    fidelity = [r for r in rows if r.get("part") == "fidelity" and "perplexity" in r]
    if fidelity:
        ci = lambda lo_hi: f"{lo_hi[0]:.3f}-{lo_hi[1]:.3f}"  # noqa: E731
        body = [[r["method"], r["cache_budget"] or "full", r["tokens"], f"{r['perplexity']:.2f}",
                 ci(r["perplexity_ci95"]), f"{r['kl']:.4f}" if "kl" in r else "-",
                 ci(r["kl_ci95"]) if "kl" in r else "-"] for r in fidelity]
        out.append(table("Long-generation fidelity (teacher-forced continuation, 95 % block bootstrap)",
                         ["method", "cache", "tokens", "perplexity", "95 % CI", "KL to full", "95 % CI"], body))
    retrieval = [r for r in rows if r.get("part") == "retrieval"]
    if retrieval:
        body = []
        for label, cap in dict.fromkeys((r["method"], r["cache_budget"]) for r in retrieval):
            runs = [r for r in retrieval if (r["method"], r["cache_budget"]) == (label, cap)]
            found = sum(r["found"] for r in runs)
            lo, hi = wilson(found, len(runs))
            body.append([label, cap or "full", len(runs), found, f"{lo:.2f}-{hi:.2f}",
                         f"{statistics.mean(r['recompressions'] for r in runs):.1f}"])
        out.append(table("Early fact recalled after re-compressions (Wilson 95 %)",
                         ["method", "cache", "n", "found", "95 % CI", "re-compressions"], body))
    speed = [r for r in rows if r.get("part") == "speed"]
    if speed:
        body = []
        for label in dict.fromkeys(r["method"] for r in speed):
            runs = [r for r in speed if r["method"] == label]
            median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
            body.append([label, runs[0]["cache_budget"] or "full", runs[0]["new_tokens"], len(runs),
                         " / ".join(f"{r['decode_tokens_per_s']:.1f}" for r in runs), f"{median('step_ms_median'):.1f}",
                         runs[0]["recompressions"], f"{100 * median('recompress_share'):.1f} %"])
        out.append(table("Decode speed over a long generation (eager; the configurations take turns)",
                         ["method", "cache", "new tokens", "runs", "tok/s per run (incl. re-compression)",
                          "median step ms", "re-compressions", "time re-compressing"], body))
    return "\n".join(out)
