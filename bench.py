"""Benchmarks on the default model (or --checkpoint), printed as tables and written as flat JSON rows.

    python bench.py quality   [--quick] [--checkpoint NAME] [--setting aware|agnostic|both] [--lengths N ...]
                              [--prompts N] [--out results/quality.json] [--plot accuracy.png]
    python bench.py speed     [--quick] [--checkpoint NAME] [--lengths N ...] [--out results/speed.json]
    python bench.py throughput [--quick] [--memory-gib 1] [--lengths 8000 4096] [--out results/throughput.json]
    python bench.py pages     [--quick] [--lengths 1024] [--out results/pages.json]
    python bench.py questions [--quick] [--out results/questions.json]
    python bench.py passkey   [--quick] [--out results/passkey.json]
    python bench.py load      [--checkpoint NAME] [--out results/load.json]

quality: every prompt is prefilled once and every method x keep is compressed from that one
prefill (the prefill does not depend on the method). Retrieval runs in the query-aware setting
(the paper's: the question is part of the prompt, inside the observation window) and the
query-agnostic one (kvpress's: the haystack is compressed alone, once, and every question
about it is appended to that one cache). Fidelity and the ablations are query-aware. Every
accuracy is printed with its number of prompts and a 95 % interval (Wilson for 0/1 scores,
bootstrap otherwise), and ChunkKV's difference from each method with a paired-bootstrap one.
speed: prefill, compression, eager and compiled decode, KV bytes and the memory-bandwidth
roofline of a decode step.
throughput: decode tokens/s at a fixed KV-cache memory (1 GiB): the largest batch of 8k-token
prompts each method's cache lets fit; and tokens/s against batch size at 4k.
pages: chunk 16 (a paged engine's page size) against chunk 10, retrieval and fidelity.
questions: time to answer k questions about one document, one prefill + k extends
(agnostic) against k full prefills (aware).
passkey: how often the CLI's pass-key demo finds its key, per keep and setting, over seeds.
load: peak resident memory of loading the checkpoint, in float32 and bfloat16, each in a fresh process.
"""
import argparse
import copy
import importlib
import inspect
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import chunkkv
from checkpoint import CheckpointError
from chunkkv import CompressionConfig
from generate import (PASSKEY_QUESTION, Recompression, answer, auto_dtype, compile_decode, compress_context,
                      extend_all, fastgen_token_ids, generate, passkey_context, prefill_and_compress)
from model import Prefill, Transformer
from registry import load, resolve

torch.set_grad_enabled(False)


# ---------------------------------------------------------------------------------------
# Text: real prose from the Python standard library's docstrings, available offline anywhere

DOC_MODULES = ("argparse collections json textwrap functools itertools pathlib subprocess threading logging "
               "email.message http.client urllib.parse csv datetime decimal fractions statistics random string "
               "shutil tempfile zipfile tarfile heapq bisect queue socket ssl inspect dataclasses enum typing "
               "contextlib abc copy pickle sqlite3 unittest doctest difflib pprint calendar hashlib hmac secrets "
               "uuid base64 gzip configparser optparse locale gettext codecs re struct array weakref types "
               "operator math numbers ipaddress mimetypes html.parser asyncio concurrent.futures multiprocessing "
               "selectors signal mmap timeit trace tracemalloc pdb ast dis tokenize platform io os glob fnmatch "
               "shelve plistlib graphlib warnings traceback").split()


def stdlib_paragraphs() -> list[str]:
    """Prose paragraphs (> 200 characters, no code) from standard-library docstrings, in a fixed order."""
    seen, paragraphs = set(), []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        members = [getattr(module, attr) for attr in sorted(dir(module)) if not attr.startswith("_")]
        for obj in [module] + [m for m in members if inspect.isclass(m) or inspect.isfunction(m)]:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                paragraph = " ".join(paragraph.split())
                if len(paragraph) > 200 and paragraph not in seen and ">>>" not in paragraph and "{" not in paragraph:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return paragraphs


def take_prose(paragraphs: list[str], tokenizer, n_tokens: int, start: int) -> list[str]:
    """Consecutive paragraphs from `start` (wrapping) until they hold about n_tokens tokens."""
    taken, count, i = [], 0, start
    while count < n_tokens:
        taken.append(paragraphs[i % len(paragraphs)])
        count += len(tokenizer.encode(taken[-1]).ids) + 1
        i += 1
    return taken


# ---------------------------------------------------------------------------------------
# Retrieval tasks (RULER-style needles in real prose), in plain completion format

KEYS = ("apple", "river", "candle", "mountain", "violin", "harbor", "falcon", "lantern", "meadow", "copper")
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n")


def retrieval_case(task: str, paragraphs, tokenizer, n_tokens: int, depth: float, rng: random.Random):
    """(context, [(question, answers)], max_new_tokens) for task single | multikey | multivalue;
    the needle asked about first sits at `depth` (0 = start, 1 = end) of the haystack; multikey
    then asks each of its other keys in turn. A prompt is the context + one question."""
    keys = rng.sample(KEYS, 4)
    values = [str(rng.randint(100000, 999999)) for _ in range(4)]
    if task == "single":
        needles, asked, answers = [(keys[0], values[0])], keys[0], values[:1]
    elif task == "multikey":  # four keys, one asked
        needles, asked, answers = list(zip(keys, values)), keys[0], values[:1]
    else:  # multivalue: one key, four values, all asked
        needles, asked, answers = [(keys[0], value) for value in values], keys[0], values
    haystack = take_prose(paragraphs, tokenizer, n_tokens - 60 - 15 * len(needles), rng.randrange(len(paragraphs)))
    spots = [round(depth * len(haystack))] + [rng.randint(0, len(haystack)) for _ in needles[1:]]
    for (key, value), spot in sorted(zip(needles, spots), key=lambda pair: -pair[1]):
        haystack.insert(spot, f"One of the special magic numbers for {key} is: {value}.")
    if task == "multivalue":
        questions = [(f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text? "
                      f"The special magic numbers for {asked} mentioned in the provided text are", answers)]
    else:
        questions = [(f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                      f"The special magic number for {key} mentioned in the provided text is", [value])
                     for key, value in needles]  # single: one; multikey: the asked key first, then the others
    return INTRO + "\n".join(haystack), questions, 8 * len(answers) + 2


# ---------------------------------------------------------------------------------------
# One prefill, many compressions

def capture(model: Transformer, tokens: torch.Tensor, max_new_tokens: int):
    """Prefill once; (last logits, each layer's (q, k, v)) to compress from again and again."""
    captured = []
    prefill = Prefill(CompressionConfig(method="full"), tokens, [tokens.shape[1]] * model.args.n_layers,
                      max_new_tokens, captured=captured)
    return model.prefill(tokens, prefill), captured


def layer_scores(config: CompressionConfig, captured) -> list[torch.Tensor | None]:
    """Each layer's token scores: scoring once serves every budget of a method."""
    return [chunkkv.score(config, q, k) for q, k, _ in captured]


def compress(model, captured, tokens, config, max_new_tokens, scores=None) -> Prefill:
    prefill = Prefill(config, tokens, config.layer_budgets(tokens.shape[1], model.args.n_layers), max_new_tokens,
                      scores=scores)
    model.compress(captured, prefill)
    return prefill


def greedy(model, logits, n_tokens: int, stop: set[int], done=None) -> list[int]:
    """Greedy tokens until a stop token (the answer's end of line), `done(tokens)` or n_tokens."""
    tokens = []
    for i in range(n_tokens):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token[0, 0]))
        if tokens[-1] in stop or (done is not None and done(tokens)):
            break
        if i < n_tokens - 1:
            logits = model.decode(token)
    return tokens


def teacher_forced(model, logits, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] of each continuation token's prediction, fed one at a time."""
    out = [logits]
    for i in range(continuation.shape[1] - 1):
        out.append(model.decode(continuation[:, i:i + 1]))
    return torch.cat(out).float().log_softmax(-1)


def layer_sets(model) -> list[list[set]]:
    """Kept positions per layer and sequence; per-head methods merged by union over KV heads."""
    sets = []
    for block in model.layers:
        positions = block.self_attn.cache.positions
        rows = positions if positions.dim() == 2 else positions.flatten(1)
        sets.append([set(row.tolist()) - {-1} for row in rows])
    return sets


def adjacent_jaccard(sets: list[list[set]]) -> float:
    pairs = [len(a & b) / len(a | b) for upper, lower in zip(sets, sets[1:]) for a, b in zip(upper, lower)]
    return statistics.mean(pairs)


# ---------------------------------------------------------------------------------------
# Progress and output

class Progress:
    def __init__(self, total: int, what: str):
        self.total, self.done, self.what, self.start = total, 0, what, time.perf_counter()

    def step(self, label: str, amount: int = 1):
        self.done += amount
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"  [{self.what} {self.done}/{self.total}] {elapsed / 60:4.1f} min elapsed, "
              f"~{eta / 60:4.1f} min left  {label}", file=sys.stderr, flush=True)


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([f"\n{title}\n", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, cells[1:])])


def mean_of(rows: list[dict], **match) -> float:
    values = [r["value"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return statistics.mean(values) if values else float("nan")


def machine() -> str:
    """The CPU's model name where Linux tells it, else the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def write_json(path: str, rows: list[dict], command: str, quiet: bool = False, dtype: torch.dtype | None = None):
    meta = {"command": command, "date": date.today().isoformat(), "machine": machine(),
            "cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    if dtype is not None:
        meta["dtype"] = str(dtype).removeprefix("torch.")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps([{**row, **meta} for row in rows], indent=1))
    if not quiet:
        print(f"\nwrote {len(rows)} rows to {path}")


# ---------------------------------------------------------------------------------------
# quality

LENGTHS = {  # default --lengths per named checkpoint and bench: up to the model's context
    "qwen2.5-coder-0.5b": {"quality": [1024, 4096, 8192, 16384], "speed": [4096, 8192, 16384]},
}
METHODS = {  # label -> config at a given keep
    "streaming": dict(method="streaming"), "h2o": dict(method="h2o"), "snapkv": dict(method="snapkv"),
    "pyramidkv": dict(method="pyramidkv"), "chunkkv": dict(method="chunkkv"),
    "chunkkv-per-head": dict(method="chunkkv", per_head=True),
}


def quality_configs(keeps, fastgen_ids) -> list[tuple[str, str, float | None, CompressionConfig]]:
    """(bench, label, keep, config): the method grid, then the reuse and chunk-size ablations at keep 0.1."""
    configs = [("main", "full", 1.0, CompressionConfig(method="full"))]
    configs += [("main", label, keep, CompressionConfig(keep=keep, **kw)) for label, kw in METHODS.items() for keep in keeps]
    special, punctuation = fastgen_ids
    configs.append(("main", "fastgen", None, CompressionConfig(method="fastgen", special_ids=special, punctuation_ids=punctuation)))
    configs += [("reuse", f"chunkkv-reuse{n}", 0.1, CompressionConfig(keep=0.1, reuse=n)) for n in (2, 3, 4)]
    configs += [("chunk", f"chunkkv-c{c}", 0.1, CompressionConfig(keep=0.1, chunk_size=c)) for c in (3, 5, 20, 30)]
    return configs


def run_quality(model, tokenizer, quick: bool, settings=("aware", "agnostic"), lengths=None, keeps=None,
                tasks=None, retrieval_only=False, prompts=None, ablations=True, continuation=None,
                on_case=None) -> list[dict]:
    """Rows of every retrieval prompt x method x keep (and setting), then fidelity, overlap and the
    ablations. `prompts` per length and task (default: one per depth), their needles' depths
    cycling through 0, 0.25, ..., 1; `on_case(rows)` after each prompt (partial results)."""
    paragraphs = stdlib_paragraphs()
    rng = random.Random(0)
    lengths = lengths or ([2048] if quick else [1024, 2048, 4096])
    depths = [0.25, 0.75] if quick else [0.0, 0.25, 0.5, 0.75, 1.0]
    prompts = prompts or len(depths)
    tasks = tasks or ["single", "multikey", "multivalue"]
    keeps = keeps or ([0.1] if quick else [0.05, 0.1, 0.2, 0.3])  # quick: one keep, as both settings run
    stop = set(tokenizer.encode("\n").ids) | {i for i in (tokenizer.token_to_id("<|endoftext|>"),
                                                         tokenizer.token_to_id("<|im_end|>")) if i is not None}
    configs = quality_configs(keeps, fastgen_token_ids(tokenizer))
    if quick or retrieval_only or not ablations:
        configs = [c for c in configs if c[0] == "main"]
    rows = []

    def evaluate(bench, **fields):
        rows.append({"bench": bench, **fields})

    encode = lambda text: torch.tensor([tokenizer.encode(text).ids])  # noqa: E731

    def found(answers):  # greedy may stop once every answer is in the text: later tokens cannot change the score
        return lambda ids: all(a in tokenizer.decode(ids) for a in answers)

    cases = [(task, n, i) for n in lengths for task in tasks for i in range(prompts)]
    progress = Progress(len(cases) + (0 if retrieval_only else 1), "quality")
    for task, n_tokens, prompt in cases:
        depth = depths[prompt % len(depths)]
        context, questions, max_new = retrieval_case(task, paragraphs, tokenizer, n_tokens, depth, rng)
        common = dict(task=task, context=n_tokens, depth=depth, prompt=prompt, metric="accuracy")
        if "aware" in settings:  # every question in its own prompt: prefilled and compressed with it
            for asked, (question, answers) in enumerate(questions):
                tokens = encode(context + question)
                logits, captured = capture(model, tokens, max_new)
                scores = {}
                for bench, label, keep, config in configs:
                    key = (config.method, config.per_head)
                    if key not in scores:  # score once per method: every keep, reuse and chunk size selects from it
                        scores[key] = layer_scores(config, captured)
                    compress(model, captured, tokens, config, max_new, scores[key])
                    answer = tokenizer.decode(greedy(model, logits, max_new, stop, found(answers)))
                    evaluate("retrieval" if bench == "main" else f"{bench}-ablation", setting="aware", method=label,
                             keep=keep, question=asked, prompt_tokens=tokens.shape[1],
                             value=sum(a in answer for a in answers) / len(answers), **common)
        if "agnostic" in settings:  # the context alone, compressed once; every question extends that cache
            tokens, asks = encode(context), [encode(question) for question, _ in questions]
            room = max(ask.shape[1] for ask in asks) + max_new
            _, captured = capture(model, tokens, room)
            scores = {}
            for bench, label, keep, config in [c for c in configs if c[0] == "main"]:
                key = (config.method, config.per_head)
                if key not in scores:
                    scores[key] = layer_scores(config, captured)
                compress(model, captured, tokens, config, room, scores[key])
                compressed = model.snapshot()
                for asked, ((_, answers), ask) in enumerate(zip(questions, asks)):
                    model.restore(compressed)
                    answer = tokenizer.decode(greedy(model, model.extend(ask)[:, -1], max_new, stop, found(answers)))
                    evaluate("retrieval", setting="agnostic", method=label, keep=keep, question=asked,
                             prompt_tokens=tokens.shape[1] + ask.shape[1],
                             value=sum(a in answer for a in answers) / len(answers), **common)
        progress.step(f"{task} {n_tokens} tokens, depth {depth:.2f}")
        if on_case is not None:
            on_case(rows)
    if retrieval_only:
        return rows

    # fidelity on real text: compress a long prose prefix, teacher-force its continuation
    n_context, n_next = (1024, continuation or 64) if quick else (2048, continuation or 256)
    prose = "\n".join(take_prose(paragraphs, tokenizer, n_context + n_next + 50, len(paragraphs) // 2))
    ids = tokenizer.encode(prose).ids
    tokens, continuation = torch.tensor([ids[:n_context]]), torch.tensor([ids[n_context:n_context + n_next]])
    logits, captured = capture(model, tokens, n_next)
    reference = None
    for bench, label, keep, config in configs:
        prefill = compress(model, captured, tokens, config, n_next)
        logprobs = teacher_forced(model, logits, continuation)
        reference = logprobs if label == "full" else reference
        nll = -logprobs.gather(1, continuation[0, :, None]).mean()
        kl = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1).mean()
        common = dict(method=label, keep=keep, prompt_tokens=n_context, continuation_tokens=n_next)
        name = "fidelity" if bench == "main" else f"{bench}-ablation"
        evaluate(name, metric="perplexity", value=math.exp(nll), **common)
        evaluate(name, metric="kl_to_full", value=float(kl), **common)
        evaluate(name, metric="kept_fraction", value=sum(prefill.kept) / (n_context * model.args.n_layers), **common)
        if bench != "chunk":
            evaluate("layer-overlap" if bench == "main" else f"{bench}-ablation", metric="adjacent_jaccard",
                     value=adjacent_jaccard(layer_sets(model)), **common)
        if bench == "reuse" or label == "chunkkv" and keep == 0.1:  # scoring time: no precomputed scores here
            seconds = []
            for _ in range(3):
                seconds.append(compress(model, captured, tokens, config, n_next).compress_seconds)
            evaluate("reuse-ablation", metric="compress_seconds", value=statistics.median(seconds), **common)
    progress.step("fidelity")
    return rows


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion of k successes in n trials."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: list[float], n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of a mean (for scores that are not 0/1 or for paired
    differences), resampled with a fixed seed so tables are reproducible."""
    if not values:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n_resamples))
    return means[int(0.025 * n_resamples)], means[int(0.975 * n_resamples) - 1]


def interval(values: list[float]) -> tuple[float, float]:
    """95 % interval of a mean accuracy: Wilson where every score is 0 or 1, else bootstrap."""
    return wilson(sum(values), len(values)) if set(values) <= {0.0, 1.0} else bootstrap(values)


def accuracy_cell(rows: list[dict], **match) -> str:
    """'0.85 [0.71, 0.93] n=40': mean accuracy of the matching rows, 95 % interval, number of prompts."""
    values = [r["value"] for r in rows if r["metric"] == "accuracy" and all(r.get(k) == v for k, v in match.items())]
    if not values:
        return ""
    low, high = interval(values)
    return f"{statistics.fmean(values):.2f} [{low:.2f}, {high:.2f}] n={len(values)}"


def paired_table(rows: list[dict]) -> str:
    """ChunkKV minus each other method at the same keep (full: all kept; fastgen: its own
    choice), over the same prompts, with a 95 % paired-bootstrap interval: a difference is
    resolved when its interval excludes 0."""
    rows = [r for r in rows if r["bench"] == "retrieval" and r["metric"] == "accuracy"]
    prompt = lambda r: (r["task"], r["context"], r.get("prompt", r["depth"]), r.get("question", 0))  # noqa: E731
    keeps = sorted({r["keep"] for r in rows if r["keep"] not in (None, 1.0)})
    cells = []
    for keep in keeps:
        ours = {prompt(r): r["value"] for r in rows if r["method"] == "chunkkv" and r["keep"] == keep}
        for label in ["full"] + [m for m in METHODS if m != "chunkkv"] + ["fastgen"]:
            theirs_keep = 1.0 if label == "full" else None if label == "fastgen" else keep
            theirs = {prompt(r): r["value"] for r in rows if r["method"] == label and r["keep"] == theirs_keep}
            diffs = [ours[p] - theirs[p] for p in ours if p in theirs]
            if not diffs:
                continue
            low, high = bootstrap(diffs)
            cells.append([keep, label, f"{statistics.fmean(diffs):+.2f} [{low:+.2f}, {high:+.2f}]", len(diffs),
                          "yes" if low > 0 or high < 0 else "no"])
    return table("ChunkKV minus each method, same prompts (95 % paired bootstrap)",
                 ["chunkkv keep", "vs", "difference", "prompts", "resolved"], cells)


def settings_table(rows: list[dict]) -> str:
    """Retrieval accuracy per method x keep x setting, with the number of prompts and a 95 %
    Wilson interval; binary tasks only (single, multikey)."""
    rows = [r for r in rows if r["bench"] == "retrieval" and r.get("setting") and r["task"] != "multivalue"]
    if not rows:
        return "\n(no single or multikey prompts ran: no table by setting)"
    settings = [s for s in ("aware", "agnostic") if any(r["setting"] == s for r in rows)]
    keeps = sorted({r["keep"] for r in rows if r["keep"] not in (None, 1.0)})
    labels = ["full"] + list(METHODS) + ["fastgen"]
    cells = []
    for label in labels:
        for keep in ([1.0] if label == "full" else [None] if label == "fastgen" else keeps):
            line, accuracies = [label, "all" if keep == 1.0 else "auto" if keep is None else keep], []
            for setting in settings:
                values = [r["value"] for r in rows if r["method"] == label and r["keep"] == keep and r["setting"] == setting]
                low, high = wilson(sum(values), len(values))
                accuracies.append(sum(values) / len(values) if values else float("nan"))
                line.append(f"{accuracies[-1]:.2f} [{low:.2f}, {high:.2f}] n={len(values)}")
            if len(settings) == 2:
                line.append(f"{accuracies[1] - accuracies[0]:+.2f}")
            cells.append(line)
    header = ["method", "keep"] + [f"{s} (95 % CI, prompts)" for s in settings] + (["agnostic - aware"] if len(settings) == 2 else [])
    tasks = sorted({r["task"] for r in rows})
    lengths = sorted({r["context"] for r in rows})
    return table(f"Retrieval accuracy by setting ({', '.join(tasks)}; ~{', '.join(map(str, lengths))} tokens)", header, cells)


def quality_tables(rows: list[dict]) -> str:
    out = [settings_table(rows)] if any(r.get("setting") == "agnostic" for r in rows) else []
    rows = [r for r in rows if r.get("setting", "aware") == "aware"]  # the tables below: query-aware
    if not any(r["bench"] == "retrieval" for r in rows):
        return "\n".join(out)
    out.append(aware_tables(rows))
    return "\n".join(out)


def aware_tables(rows: list[dict]) -> str:
    keeps = sorted({r["keep"] for r in rows if r["bench"] == "retrieval" and r["keep"] not in (None, 1.0)})
    labels = ["full"] + list(METHODS) + ["fastgen"]
    lengths = sorted({r["context"] for r in rows if r["bench"] == "retrieval"})
    out = []
    acc = [[label] + [accuracy_cell(rows, bench="retrieval", method=label, keep=k) for k in
                      ([1.0] if label == "full" else [None] if label == "fastgen" else keeps)] for label in labels]
    out.append(table("Retrieval accuracy (mean over tasks, lengths, depths; 95 % interval; prompts)",
                     ["method"] + [f"keep {k}" for k in keeps], [row + [""] * (len(keeps) + 1 - len(row)) for row in acc]))
    tasks = [t for t in ("single", "multikey", "multivalue") if any(r.get("task") == t for r in rows)]
    per_task = [[label] + [accuracy_cell(rows, bench="retrieval", method=label, task=t,
                                   keep=1.0 if label == "full" else None if label == "fastgen" else 0.1) for t in tasks]
                for label in labels]
    out.append(table("Retrieval accuracy by task at keep 0.1 (full keeps all, fastgen chooses)", ["method"] + tasks, per_task))
    by_length = [[label] + [accuracy_cell(rows, bench="retrieval", method=label, context=n,
                                    keep=1.0 if label == "full" else None if label == "fastgen" else 0.1) for n in lengths]
                 for label in labels]
    out.append(table("Retrieval accuracy by prompt length at keep 0.1", ["method"] + [f"~{n} tokens" for n in lengths],
                     by_length))
    out.append(paired_table(rows))
    if not any(r["bench"] == "fidelity" for r in rows):
        return "\n".join(out)  # --retrieval-only
    fid = []
    for label in labels:
        for keep in ([1.0] if label == "full" else [None] if label == "fastgen" else keeps):
            fid.append([label, keep if keep is not None else "auto",
                        mean_of(rows, bench="fidelity", method=label, keep=keep, metric="kept_fraction"),
                        mean_of(rows, bench="fidelity", method=label, keep=keep, metric="perplexity"),
                        mean_of(rows, bench="fidelity", method=label, keep=keep, metric="kl_to_full")])
    out.append(table("Fidelity: teacher-forced continuation of real text", ["method", "keep", "kept", "perplexity",
                                                                            "KL to full"], fid))
    overlap = [[label, mean_of(rows, bench="layer-overlap", method=label, keep=0.1 if label != "fastgen" else None)]
               for label in labels[1:]]
    out.append(table("Adjacent-layer Jaccard of kept positions at keep 0.1 (per-head methods: union of heads)",
                     ["method", "jaccard"], overlap))
    reuse = []
    for n, label in enumerate(["chunkkv", "chunkkv-reuse2", "chunkkv-reuse3", "chunkkv-reuse4"], start=1):
        bench = "retrieval" if n == 1 else "reuse-ablation"
        fbench = "fidelity" if n == 1 else "reuse-ablation"
        reuse.append([n, accuracy_cell(rows, bench=bench, method=label, keep=0.1),
                      mean_of(rows, bench=fbench, method=label, keep=0.1, metric="perplexity"),
                      mean_of(rows, bench=fbench, method=label, keep=0.1, metric="kl_to_full"),
                      1000 * mean_of(rows, bench="reuse-ablation", method=label, metric="compress_seconds")])
    if not any(r["bench"] == "reuse-ablation" and r["metric"] == "accuracy" for r in rows):
        return "\n".join(out)  # --quick runs no ablations
    out.append(table("Layer-wise index reuse, ChunkKV keep 0.1", ["reuse depth", "retrieval", "perplexity",
                                                                 "KL to full", "compression ms"], reuse))
    chunk = []
    for c in (3, 5, 10, 20, 30):
        label, bench = ("chunkkv", "retrieval") if c == 10 else (f"chunkkv-c{c}", "chunk-ablation")
        fbench = "fidelity" if c == 10 else "chunk-ablation"
        chunk.append([c, accuracy_cell(rows, bench=bench, method=label, keep=0.1),
                      mean_of(rows, bench=fbench, method=label, keep=0.1, metric="perplexity"),
                      mean_of(rows, bench=fbench, method=label, keep=0.1, metric="kl_to_full")])
    out.append(table("Chunk size, ChunkKV keep 0.1", ["chunk", "retrieval", "perplexity", "KL to full"], chunk))
    return "\n".join(out)


def plot(rows: list[dict], path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("setting", "aware") == "aware"]
    keeps = sorted({r["keep"] for r in rows if r["bench"] == "retrieval" and r["keep"] not in (None, 1.0)})
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in METHODS:
        ax.plot(keeps, [mean_of(rows, bench="retrieval", method=label, keep=k) for k in keeps], marker="o", label=label)
    ax.axhline(mean_of(rows, bench="retrieval", method="full"), color="gray", linestyle="--", label="full")
    ax.set(xlabel="keep (fraction of the prompt KV cache)", ylabel="retrieval accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------
# speed

def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median, spread = max - min) of fn's wall time over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def memory_bandwidth() -> float:
    """Bytes per second of a large copy (read + write), the decode step's limit."""
    src = torch.ones(256 * 2**20)  # 1 GiB of float32
    dst = torch.empty_like(src)
    seconds, _ = median_seconds(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * src.element_size() / seconds


def gemm_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of a large square matmul in `dtype`: the ceiling of a prefill."""
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
    hf = transformers.AutoModelForCausalLM.from_pretrained(resolve(checkpoint), dtype=dtype).eval()
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


def compile_start_seconds(checkpoint: str | None, dtype: torch.dtype) -> dict:
    """Wall time of a whole `generate.py --compile` run in a fresh process with an empty compile
    cache, then again with that cache (the cached start), and without --compile."""
    def wall(args, cache_dir):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        command = [*args, "--dtype", str(dtype).removeprefix("torch."), *(["--checkpoint", checkpoint] if checkpoint else [])]
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, cwd=Path(__file__).parent)
        return time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = wall(COMPILE_PROBE, cache_dir)
        cached = wall(COMPILE_PROBE, cache_dir)
        eager = wall([a for a in COMPILE_PROBE if a != "--compile"], cache_dir)
    return {"cold_start_s": cold, "cached_start_s": cached, "eager_start_s": eager}


def decode_seconds(model, decode, n_batch: int, n_steps: int) -> tuple[float, float, float]:
    """Median and spread of one decode step's time after two warm-up steps, and the first step's
    (with compilation, for a compiled step)."""
    token = torch.zeros(n_batch, 1, dtype=torch.long)
    times, compressed = [], model.snapshot()
    for _ in range(n_steps + 2):
        start = time.perf_counter()
        decode(token).clone()
        times.append(time.perf_counter() - start)
    model.restore(compressed)  # the next mode decodes from the same cache
    return statistics.median(times[2:]), max(times[2:]) - min(times[2:]), times[0]


SPEED_CONFIGS = {"full": CompressionConfig(method="full"), "chunkkv": CompressionConfig(keep=0.1),
                 "chunkkv-reuse2": CompressionConfig(keep=0.1, reuse=2),
                 "snapkv": CompressionConfig(method="snapkv", keep=0.1)}


def run_speed(model, tokenizer, quick: bool, lengths=None, methods=None, batches=None, compiled=True,
              checkpoint: str | None = None, compare: bool = True) -> list[dict]:
    """Prefill (against the GEMM peak), compression, and eager / compiled decode (against the
    bandwidth roofline) per length, method and batch; with `compare`, transformers' `generate` on
    the same prompt (full cache, batch 1) and the start time of a compiled run in a fresh process."""
    torch._dynamo.config.cache_size_limit = 64  # one graph per cache size; many sizes in one run
    torch._dynamo.config.automatic_dynamic_shapes = False  # each size gets static shapes, as in use
    lengths = lengths or ([1024] if quick else [1024, 2048, 4096, 8000])
    batches = batches or ([1] if quick else [1, 4])
    n_steps = 8 if quick else 16
    configs = {label: SPEED_CONFIGS[label] for label in methods or (["full", "chunkkv"] if quick else SPEED_CONFIGS)}
    paragraphs = stdlib_paragraphs()
    dtype = model.lm_head.weight.dtype
    bandwidth, peak = memory_bandwidth(), gemm_peak(dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
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
        prefill_s, prefill_spread = median_seconds(lambda: last.__setitem__(0, capture(model, tokens, 64)), repeats)
        captured = last[0][1]
        rows.append({"bench": "speed", "prompt_tokens": n_tokens, "metric": "prefill_seconds", "value": prefill_s,
                     "spread": prefill_spread, "of_gemm_peak": prefill_flops(model.args, n_tokens) / prefill_s / peak})
        if hf is not None:
            hf_step = transformers_decode_seconds(hf, tokens, n_steps)
            rows.append({"bench": "speed", "method": "transformers", "keep": 1.0, "prompt_tokens": n_tokens, "batch": 1,
                         "metric": "decode_tokens_per_s", "value": 1 / hf_step, "step_ms": 1000 * hf_step})
        for label, config in configs.items():
            seconds = [compress(model, captured, tokens, config, 64).compress_seconds for _ in range(5)]
            common = {"bench": "speed", "method": label, "keep": 0.1 if label != "full" else 1.0, "prompt_tokens": n_tokens}
            rows.append({**common, "metric": "compress_seconds", "value": statistics.median(seconds),
                         "spread": max(seconds) - min(seconds), "share_of_prefill": statistics.median(seconds) / prefill_s})
            for n_batch in batches:
                # decode speed does not depend on content: batch rows are copies of the one prompt
                batch = [tuple(t.expand(n_batch, *t.shape[1:]) for t in layer) for layer in captured]
                prefill = compress(model, batch, tokens.expand(n_batch, -1), config, 64)
                kv_bytes = sum(2 * b.self_attn.cache.k.numel() * b.self_attn.cache.k.element_size() for b in model.layers)
                for mode, decode in modes:
                    torch._dynamo.reset()  # frees the last size's graph and its frozen copy of the weights
                    rss_before = rss_mib()
                    step_s, spread, first_s = decode_seconds(model, decode, n_batch, n_steps)
                    roofline_s = (weight_bytes + kv_bytes) / bandwidth
                    rows.append({**common, "batch": n_batch, "mode": mode, "metric": "decode_tokens_per_s",
                                 "value": n_batch / step_s, "step_ms": 1000 * step_s, "spread_ms": 1000 * spread,
                                 "roofline_ms": 1000 * roofline_s, "of_roofline": roofline_s / step_s,
                                 "first_step_s": first_s, "rss_added_mib": rss_mib() - rss_before})
                rows.append({**common, "batch": n_batch, "metric": "kv_cache_bytes", "value": kv_bytes,
                             "kept_per_layer": statistics.mean(prefill.kept)})
                rows.append({**common, "batch": n_batch, "metric": "peak_rss_mib_so_far",
                             "value": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                progress.step(f"{n_tokens} tokens, {label}, batch {n_batch}")
    if compare and compiled:
        rows.append({"bench": "speed", "metric": "start_seconds", **compile_start_seconds(checkpoint, dtype)})
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
    compiled = [r for r in rows if r.get("mode") == "compiled"]
    if compiled:
        out.append(f"\ncompiling a decode graph (first step): {min(r['first_step_s'] for r in compiled):.0f}-"
                   f"{max(r['first_step_s'] for r in compiled):.0f} s; resident memory it adds (frozen weights): "
                   f"{statistics.median(r['rss_added_mib'] for r in compiled):.0f} MiB (median)")
    start = find(metric="start_seconds")
    if start:
        out.append(f"generate.py --compile, whole run in a fresh process: {start['cold_start_s']:.0f} s with an empty "
                   f"compile cache, {start['cached_start_s']:.0f} s cached; {start['eager_start_s']:.0f} s without --compile")
    peak_rss = max(r["value"] for r in rows if r["metric"] == "peak_rss_mib_so_far")
    out.append(f"\npeak process memory (RSS) over the whole run: {peak_rss:.0f} MiB")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# throughput at equal memory: a smaller cache lets more sequences decode at once

THROUGHPUT_CONFIGS = {"full": CompressionConfig(method="full"), "chunkkv": CompressionConfig(keep=0.1),
                      "chunkkv-reuse2": CompressionConfig(keep=0.1, reuse=2)}


def cache_bytes(model) -> int:
    """Bytes every layer's cache holds now: K, V and the valid mask."""
    return sum(2 * c.k.numel() * c.k.element_size() + c.valid.numel() for c in model.caches())


def replicated(model, captured, tokens, config, n_batch: int, max_new_tokens: int) -> Prefill:
    """Compress `n_batch` copies of one captured prefill: decode speed does not depend on the
    content, so the rows of a large batch are copies of one prompt (prefilled once)."""
    batch = [tuple(t.expand(n_batch, *t.shape[1:]) for t in layer) for layer in captured]
    return compress(model, batch, tokens.expand(n_batch, -1), config, max_new_tokens)


def step_times(model, n_batch: int, n_steps: int) -> list[float]:
    """Seconds of each of n_steps eager decode steps after one warm-up step."""
    token, times = torch.zeros(n_batch, 1, dtype=torch.long), []
    for _ in range(n_steps + 1):
        start = time.perf_counter()
        model.decode(token)
        times.append(time.perf_counter() - start)
    return times[1:]


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
        prefill = replicated(model, captured, tokens, config, n_batch, n_new)
        times = step_times(model, n_batch, n_steps)
        rows.append({"bench": "throughput", "method": label, "batch": n_batch, "prompt_tokens": tokens.shape[1],
                     "metric": "decode_step_seconds", "values": times, "kv_cache_bytes": cache_bytes(model),
                     "compress_seconds_batch": prefill.compress_seconds, "load_average_1min": os.getloadavg()[0],
                     **fields})
        progress.step(f"{tokens.shape[1]} tokens, {label}, batch {n_batch}")

    # (i) equal memory: each method's largest batch, from the cache size of one row
    tokens = prompt(long)
    start = time.perf_counter()
    _, captured = capture(model, tokens, n_new)
    rows.append({"bench": "throughput", "prompt_tokens": long, "metric": "prefill_seconds",
                 "value": time.perf_counter() - start, "load_average_1min": os.getloadavg()[0]})
    progress.step(f"prefill {long}")
    fits = {}
    for label, config in THROUGHPUT_CONFIGS.items():
        prefill = replicated(model, captured, tokens, config, 1, n_new)
        fits[label] = memory // cache_bytes(model)
        rows.append({"bench": "throughput", "method": label, "prompt_tokens": long, "metric": "max_batch",
                     "value": fits[label], "memory_bytes": memory, "row_bytes": cache_bytes(model),
                     "compress_seconds": prefill.compress_seconds})
    for _ in range(repeats):
        for label, config in THROUGHPUT_CONFIGS.items():
            measure(label, config, captured, tokens, fits[label], setting="equal_memory", memory_bytes=memory)
    del captured

    # (ii) tokens/s against batch size
    tokens = prompt(short)
    _, captured = capture(model, tokens, n_new)
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
# page-aligned chunks: what chunk 16 (a serving engine's page) costs against the paper's 10

PAGE_CONFIGS = {"full": CompressionConfig(method="full"), "chunkkv-c10": CompressionConfig(keep=0.1, chunk_size=10),
                "chunkkv-c16": CompressionConfig(keep=0.1, chunk_size=16)}


def run_pages(model, tokenizer, quick: bool, lengths=None) -> list[dict]:
    """Query-aware retrieval (single, multikey) and fidelity on prose, chunk 16 against chunk 10
    at keep 0.1, with the quality bench's cases and machinery (one prefill, every config)."""
    paragraphs, rng, rows = stdlib_paragraphs(), random.Random(0), []
    lengths = lengths or [1024]
    depths = [0.25, 0.75] if quick else [0.1, 0.3, 0.5, 0.7, 0.9]
    stop = set(tokenizer.encode("\n").ids) | {tokenizer.token_to_id("<|endoftext|>")} - {None}
    cases = [(task, n, d) for n in lengths for task in ("single", "multikey") for d in depths]
    progress = Progress(len(cases) + 1, "pages")
    for task, n_tokens, depth in cases:
        context, questions, max_new = retrieval_case(task, paragraphs, tokenizer, n_tokens, depth, rng)
        question, answers = questions[0]
        tokens = torch.tensor([tokenizer.encode(context + question).ids])
        logits, captured = capture(model, tokens, max_new)
        scores = layer_scores(PAGE_CONFIGS["chunkkv-c10"], captured)  # chunk size does not change the scores
        for label, config in PAGE_CONFIGS.items():
            compress(model, captured, tokens, config, max_new, scores if label != "full" else None)
            answer = tokenizer.decode(greedy(model, logits, max_new, stop))
            rows.append({"bench": "pages", "metric": "accuracy", "method": label, "task": task, "context": n_tokens,
                         "depth": depth, "prompt_tokens": tokens.shape[1], "value": float(answers[0] in answer)})
        progress.step(f"{task} {n_tokens} tokens, depth {depth}")
    n_context, n_next = (512, 32) if quick else (1024, 128)
    prose = "\n".join(take_prose(paragraphs, tokenizer, n_context + n_next + 50, len(paragraphs) // 2))
    ids = tokenizer.encode(prose).ids
    tokens, continuation = torch.tensor([ids[:n_context]]), torch.tensor([ids[n_context:n_context + n_next]])
    logits, captured = capture(model, tokens, n_next)
    reference = None
    for label, config in PAGE_CONFIGS.items():
        compress(model, captured, tokens, config, n_next)
        logprobs = teacher_forced(model, logits, continuation)
        reference = logprobs if reference is None else reference
        kl = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1)  # [n_next], per token
        nll = -logprobs.gather(1, continuation[0, :, None])[:, 0]
        rows.append({"bench": "pages", "metric": "fidelity", "method": label, "prompt_tokens": n_context,
                     "continuation_tokens": n_next, "kl_per_token": kl.tolist(), "nll_per_token": nll.tolist()})
    progress.step("fidelity")
    return rows


def pages_table(rows: list[dict]) -> str:
    cells = []
    for label in PAGE_CONFIGS:
        hits = [r["value"] for r in rows if r["metric"] == "accuracy" and r["method"] == label]
        low, high = wilson(sum(hits), len(hits))
        fid = next(r for r in rows if r["metric"] == "fidelity" and r["method"] == label)
        kl = torch.tensor(fid["kl_per_token"])
        half = 1.96 * kl.std() / math.sqrt(len(kl))  # normal interval of the mean over continuation tokens
        cells.append([label, f"{sum(hits):.0f}/{len(hits)} [{low:.2f}, {high:.2f}]",
                      f"{math.exp(statistics.mean(fid['nll_per_token'])):.2f}",
                      f"{kl.mean():.3f} [{kl.mean() - half:.3f}, {kl.mean() + half:.3f}]"])
    return table("Page-aligned chunks (keep 0.1, query-aware retrieval single + multikey; 95 % intervals)",
                 ["method", "retrieval hits [Wilson]", "perplexity", "KL to full per token [normal]"], cells)


# ---------------------------------------------------------------------------------------
# k questions about one document; the pass-key demo over seeds

def run_questions(model, tokenizer, quick: bool, lengths=None, n_questions=None) -> list[dict]:
    """Seconds to answer the first k questions about one document: aware = k prefills of
    document + question, each compressed; agnostic = one prefill and compression of the
    document, then per question a restore, an extend and the answer. Every answer is 8 greedy
    tokens (no stop), so both settings decode the same amount."""
    return [row for n_tokens in lengths or ([1024] if quick else [4096])
            for row in questions_at(model, tokenizer, quick, n_tokens, n_questions or (2 if quick else 16))]


def questions_at(model, tokenizer, quick: bool, n_tokens: int, n_questions: int) -> list[dict]:
    n_answer = 8
    ids = tokenizer.encode("\n".join(take_prose(stdlib_paragraphs(), tokenizer, n_tokens, 0))).ids[:n_tokens]
    document = torch.tensor([ids])
    questions = [torch.tensor([tokenizer.encode(f"\nWhat is the special magic number for {KEYS[i % len(KEYS)]} "
                                                f"number {i}? The special magic number is").ids])
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
    rows = []
    for (label, setting), times in seconds.items():
        once = times[0] if setting == "agnostic" else 0.0
        per_question = times[1:] if setting == "agnostic" else times
        for k in sorted({k for k in (1, 4, 16) if k <= n_questions} | {n_questions}):
            rows.append({"bench": "questions", "setting": setting, "method": label, "keep": 0.1 if label != "full" else 1.0,
                         "prompt_tokens": n_tokens, "k": k, "answer_tokens": n_answer, "metric": "seconds",
                         "value": once + sum(per_question[:k]), "compress_once_seconds": once})
    return rows


def questions_table(rows: list[dict]) -> str:
    find = lambda **m: next(r for r in rows if all(r.get(k) == v for k, v in m.items()))  # noqa: E731
    cells = []
    for n in sorted({r["prompt_tokens"] for r in rows}):
        for k in sorted({r["k"] for r in rows if r["prompt_tokens"] == n}):
            aware, agnostic = (find(method="chunkkv", setting=s, k=k, prompt_tokens=n) for s in ("aware", "agnostic"))
            full = find(method="full", setting="agnostic", k=k, prompt_tokens=n)
            cells.append([n, k, f"{aware['value']:.1f}",
                          f"{agnostic['value']:.1f} (once: {agnostic['compress_once_seconds']:.1f})",
                          f"{aware['value'] / agnostic['value']:.1f}x",
                          f"{full['value']:.1f} (once: {full['compress_once_seconds']:.1f})"])
    return table(f"Seconds to answer the first k questions about one document ({rows[0]['answer_tokens']} "
                 f"answer tokens each; once = the one prefill + compression)",
                 ["document tokens", "k", "chunkkv 0.1 aware: k prefills", "chunkkv 0.1 agnostic: 1 prefill + k extends",
                  "speed-up", "full cache agnostic"], cells)


def run_passkey(model, tokenizer, quick: bool) -> list[dict]:
    """The CLI's pass-key demo (chunkkv, chunk 10, window 32) over seeds: does the answer hold
    the key, with the question in the prompt (aware) or appended after compression (agnostic)?"""
    seeds, keeps = (range(1), [0.1]) if quick else (range(5), [0.1, 0.2, 0.3])
    encode = lambda text: torch.tensor([tokenizer.encode(text).ids])  # noqa: E731
    rows, progress = [], Progress(len(seeds), "passkey")
    question = encode(PASSKEY_QUESTION)
    for seed in seeds:
        context, key = passkey_context(seed=seed)
        for setting in ("aware", "agnostic"):
            tokens = encode(context + PASSKEY_QUESTION) if setting == "aware" else encode(context)
            room = 16 + (0 if setting == "aware" else question.shape[1])
            logits, captured = capture(model, tokens, room)
            for keep in [1.0] + keeps:
                config = CompressionConfig(method="full") if keep == 1.0 else CompressionConfig(keep=keep)
                compress(model, captured, tokens, config, room)
                if setting == "agnostic":
                    logits = model.extend(question)[:, -1]
                answer_text = tokenizer.decode(greedy(model, logits, 16, set()))
                rows.append({"bench": "passkey", "setting": setting, "method": config.method, "keep": keep, "seed": seed,
                             "prompt_tokens": tokens.shape[1], "metric": "found", "value": float(key in answer_text)})
        progress.step(f"seed {seed}")
    return rows


def passkey_table(rows: list[dict]) -> str:
    cells = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        line = ["full" if keep == 1.0 else f"chunkkv keep {keep}"]
        for setting in ("aware", "agnostic"):
            values = [r["value"] for r in rows if r["keep"] == keep and r["setting"] == setting]
            low, high = wilson(sum(values), len(values))
            line.append(f"{sum(values):.0f}/{len(values)} [{low:.2f}, {high:.2f}]")
        cells.append(line)
    return table("Pass-key demo: key found, over seeds (95 % Wilson interval)",
                 ["cache", "aware (question in the prompt)", "agnostic (question after compression)"], cells)


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
    room = cache_budget - min(recompression.budget, prompt.shape[1])
    first, _ = prefill_and_compress(model, prompt, recompression.config, room, cache_budget, keep_queries=True)
    rest = extend_all(model, continuation, recompression)
    return torch.cat([first[:, None], rest], 1)[0], recompression


def run_recompress(model, tokenizer, quick: bool, caps=(256, 512), parts=("fidelity", "retrieval", "speed"),
                   n_texts: int | None = None, n_cases: int | None = None, n_new: int | None = None) -> list[dict]:
    """Fidelity (perplexity and KL to the full cache, teacher-forced), retrieval of an early fact
    after many re-compressions, and decode speed, for caches capped at `caps` entries that keep
    3/4 of the cap after each re-compression. Plain completion format; the fact is asked after
    compression (query-agnostic)."""
    paragraphs = stdlib_paragraphs()
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
                logits = model.prefill(ids, Prefill(CompressionConfig(method="full"), ids,
                                                    [ids.shape[1]] * model.args.n_layers, 12))
                recompression = None
            else:
                all_logits, recompression = through_recompression(model, prompt, rest, CompressionConfig(
                    **RECOMPRESS_METHODS[label]), cap)
                logits = all_logits[-1:]
            tokens = []
            for i in range(10):  # greedy; the cache is re-compressed when full, as in generate
                token = logits.argmax(-1, keepdim=True)
                tokens.append(int(token[0, 0]))
                if tokens[-1] in stop or i == 9:
                    break
                if recompression is not None:
                    recompression.make_room(model, 1)
                logits = model.decode(token)
            found = value in tokenizer.decode(tokens)
            rows.append({"bench": "recompress", "part": "retrieval", "method": label, "cache_budget": cap,
                         "case": case, "context_tokens": prompt.shape[1] + rest.shape[1], "found": found,
                         "recompressions": recompression.count if recompression else 0})
            progress.step(f"case {case}, {label}, cap {cap}: {'found' if found else 'missed'}")
    return rows


def recompress_speed(model, tokenizer, paragraphs, n_new: int) -> list[dict]:
    """Decode tokens/s (eager) over an n_new-token greedy generation after a 256-token prompt:
    full cache vs a 512-entry cache re-compressed when full, and the share re-compressing takes."""
    ids = torch.tensor([tokenizer.encode("\n".join(take_prose(paragraphs, tokenizer, 300, 11))).ids[:256]])
    rows = []
    for label, config, cap in (("full", CompressionConfig(method="full"), None),
                               ("chunkkv", CompressionConfig(), 512), ("snapkv", CompressionConfig(method="snapkv"), 512),
                               ("streaming", CompressionConfig(method="streaming"), 512)):
        stats = {}
        start = time.perf_counter()
        generate(model, ids, config, n_new, cache_budget=cap, stats=stats)
        total = time.perf_counter() - start - stats["prefill_seconds"]
        steps = stats["decode_step_seconds"]
        rows.append({"bench": "recompress", "part": "speed", "method": label, "cache_budget": cap,
                     "prompt_tokens": 256, "new_tokens": stats["new_tokens"],
                     "decode_tokens_per_s": len(steps) / total, "step_ms_median": 1000 * statistics.median(steps),
                     "recompressions": stats.get("recompressions", 0),
                     "recompress_seconds": stats.get("recompress_seconds", 0.0),
                     "recompress_share": stats.get("recompress_seconds", 0.0) / total, "mode": "eager"})
        print(f"  [speed] {label}: {rows[-1]['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
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
        body = [[r["method"], r["cache_budget"] or "full", r["new_tokens"], f"{r['decode_tokens_per_s']:.1f}",
                 f"{r['step_ms_median']:.1f}", r["recompressions"], f"{100 * r['recompress_share']:.1f} %"]
                for r in speed]
        out.append(table("Decode speed over a long generation (eager)",
                         ["method", "cache", "new tokens", "tok/s (incl. re-compression)", "median step ms",
                          "re-compressions", "time re-compressing"], body))
    return "\n".join(out)


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
                                cwd=Path(__file__).parent)
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


# ---------------------------------------------------------------------------------------

def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["quality", "speed", "throughput", "pages", "questions", "passkey",
                                          "recompress", "load"])
    parser.add_argument("--quick", action="store_true", help="a small subset: minutes, not the full run")
    parser.add_argument("--setting", choices=["aware", "agnostic", "both"], default="both",
                        help="quality: retrieval with the question in the prompt (aware), after compression "
                             "(agnostic), or both (default)")
    parser.add_argument("--retrieval-only", action="store_true", help="quality: skip fidelity, overlap and ablations")
    parser.add_argument("--lengths", type=positive, nargs="+", help="quality: haystack lengths in tokens; speed: prompt "
                        "lengths (default: per checkpoint, see LENGTHS; else 1024 2048 4096 / 1024 2048 4096 8000)")
    parser.add_argument("--prompts", type=positive, help="quality: prompts per length and task, their needles' depths "
                        "cycling through 0, 0.25, 0.5, 0.75, 1 (default 5; 2 with --quick)")
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                        help="quality: the reuse-depth and chunk-size ablations (default on)")
    parser.add_argument("--fidelity-tokens", type=positive, help="quality: teacher-forced continuation tokens (default 256)")
    parser.add_argument("--methods", nargs="+", choices=list(SPEED_CONFIGS), help="speed: methods (default all)")
    parser.add_argument("--batches", type=positive, nargs="+", help="speed: batch sizes (default 1 4)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="speed: also time the compiled decode step (default on)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="speed: also time transformers' generate on the same prompt (when installed) and the "
                             "start of a compiled run in a fresh process (default on)")
    parser.add_argument("--questions", type=positive, help="questions: questions asked per document (default 16)")
    parser.add_argument("--memory-gib", type=float, default=1.0, help="throughput: KV-cache memory (default 1)")
    parser.add_argument("--keeps", type=float, nargs="+", help="quality: kept fractions")
    parser.add_argument("--tasks", nargs="+", choices=["single", "multikey", "multivalue"], help="quality: retrieval tasks")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights and activations (default auto: as generate.py, bfloat16 on CPUs with native "
                             "bfloat16, else float32)")
    parser.add_argument("--out", help="JSON rows (default results/<bench>.json)")
    parser.add_argument("--checkpoint", help="a checkpoint name (see generate.py --help), Hugging Face "
                        "directory or .gguf file (default: smollm2-135m)")
    parser.add_argument("--plot", help="quality: draw accuracy vs keep to this PNG (needs matplotlib)")
    parser.add_argument("--parts", nargs="+", choices=["fidelity", "retrieval", "speed"],
                        default=["fidelity", "retrieval", "speed"], help="recompress: which parts to run")
    parser.add_argument("--texts", type=int, help="recompress: fidelity texts (default 3)")
    parser.add_argument("--cases", type=int, help="recompress: retrieval cases (default 8)")
    parser.add_argument("--new-tokens", type=int, help="recompress: tokens generated for speed (default 1024)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        if args.bench == "load":  # measured in fresh processes: this one loads nothing
            command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
            rows = run_load(resolve(args.checkpoint))
            print(f"{command}\n{date.today()}, {machine()}, torch {torch.__version__}\n{load_table(rows)}")
            write_json(args.out or "results/load.json", rows, command)
            return 0
        dtype = auto_dtype(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
        model, tokenizer = load(args.checkpoint, dtype=dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lengths = args.lengths or (None if args.quick else LENGTHS.get(args.checkpoint, {}).get(args.bench))
    room = 64 if args.bench in ("speed", "throughput") else 200  # new tokens; or a question and its answer
    if lengths and max(lengths) + room > model.args.max_seq_len:
        print(f"error: --lengths {max(lengths)} does not fit the model's context of {model.args.max_seq_len} tokens: "
              f"pass lengths up to {model.args.max_seq_len - room}", file=sys.stderr)
        return 2
    command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{command}\n{date.today()}, {machine()}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}")
    start = time.perf_counter()
    if args.bench == "quality":
        settings = ("aware", "agnostic") if args.setting == "both" else (args.setting,)
        out = args.out or f"results/{args.bench}.json"
        rows = run_quality(model, tokenizer, args.quick, settings, lengths, args.keeps, args.tasks, args.retrieval_only,
                           args.prompts, args.ablations, args.fidelity_tokens,
                           on_case=lambda rows: write_json(out, rows, command + "  # partial", quiet=True, dtype=dtype))
        print(quality_tables(rows))
    elif args.bench == "speed":
        rows = run_speed(model, tokenizer, args.quick, lengths, args.methods, args.batches, args.compile,
                         args.checkpoint, args.compare)
        print(speed_tables(rows))
    elif args.bench == "throughput":
        rows = run_throughput(model, tokenizer, args.quick, args.memory_gib, args.lengths)
        print(throughput_tables(rows))
    elif args.bench == "pages":
        rows = run_pages(model, tokenizer, args.quick, args.lengths)
        print(pages_table(rows))
    elif args.bench == "questions":
        rows = run_questions(model, tokenizer, args.quick, args.lengths, args.questions)
        print(questions_table(rows))
    elif args.bench == "recompress":
        rows = run_recompress(model, tokenizer, args.quick, parts=args.parts, n_texts=args.texts, n_cases=args.cases,
                              n_new=args.new_tokens)
        print(recompress_tables(rows))
    else:
        rows = run_passkey(model, tokenizer, args.quick)
        print(passkey_table(rows))
    print(f"\n{args.bench} benchmark took {(time.perf_counter() - start) / 60:.1f} min")
    write_json(args.out or f"results/{args.bench}.json", rows, command, dtype=dtype)
    if args.plot and args.bench == "quality":
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
