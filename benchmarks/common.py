"""What every benchmark in bench.py uses: real prose and RULER-style retrieval cases, one prefill
compressed many ways, progress on stderr, tables, JSON rows that record the machine (written
atomically), and 95 % intervals. Importing it turns autograd off, for every benchmark."""
import importlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from chunkkv import CompressionConfig
from generate import decode_tokens
from model import CacheRequest, Transformer

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


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # RULER's noise


def haystack_paragraphs(haystack: str) -> list[str]:
    """The paragraphs a retrieval haystack is cut from: "prose" (stdlib_paragraphs) or "filler", RULER's
    one repeated sentence group (Hsieh et al., 2024), where every paragraph is the same."""
    return stdlib_paragraphs() if haystack == "prose" else [FILLER]


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

def layer_scores(config: CompressionConfig, captured) -> list[torch.Tensor | None]:
    """Each layer's token scores (None for methods without): scoring once serves every budget of a method."""
    return [config.row.score(config, q, k) if config.row.score else None for q, k, _ in captured]


def compress(model: Transformer, captured, tokens: torch.Tensor, config: CompressionConfig, max_new_tokens: int,
             scores=None) -> float:
    """Fill the caches from a captured prefill (model.capture) of `tokens` [B, T], as `config` says;
    seconds spent compressing."""
    n_batch, n_prompt = tokens.shape
    budgets = [config.layer_budgets(n_prompt, model.args.n_layers)] * n_batch
    return model.compress(captured, CacheRequest(config, [n_prompt] * n_batch, budgets, max_new_tokens,
                                                 tokens=tokens, scores=scores))


def greedy(model: Transformer, logits: torch.Tensor, n_tokens: int, stop: set[int]) -> list[int]:
    """Greedy tokens of row 0 until a stop token (the answer's end of line) or n_tokens."""
    return decode_tokens(model, logits, n_tokens, stop_tokens=tuple(stop))[0][0].tolist()


def replicated(captured, n_batch: int) -> list[tuple]:
    """A captured prefill of one prompt as `n_batch` identical rows: decode speed does not depend on
    the content, so the rows of a large batch are copies of one prompt, prefilled once."""
    return [tuple(t.expand(n_batch, *t.shape[1:]) for t in layer) for layer in captured]


def decode_step_seconds(model: Transformer, n_batch: int, n_steps: int, decode=None) -> tuple[list[float], list]:
    """Seconds of `n_steps` decode steps (generate's decode loop, greedy) from the caches as they are,
    which are then restored (the next measurement decodes from the same cache): (the steady steps, the
    warm-up steps, which compiled or recorded a graph)."""
    snapshot = model.snapshot()
    logits = torch.zeros(n_batch, model.args.vocab_size, device=model.embed_tokens.weight.device)
    steps, warmup = decode_tokens(model, logits, n_steps + 1, decode=decode)[1:]
    model.restore(snapshot)
    return steps, warmup


def kept_per_layer(model: Transformer, n_prompt: int) -> list[float]:
    """Prompt entries each layer's cache keeps (mean over rows and KV heads), asked from the caches."""
    return [(kept >= 0).sum(-1).float().mean().item() for kept in model.kept_positions([n_prompt])]


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


def machine() -> str:
    """The CPU's model name where Linux tells it, else the architecture; and the GPU the bench runs on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.machine()
    device = torch.get_default_device()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{name}, {torch.get_num_threads()} threads{gpu}"


def write_json(path: str | Path, rows: list[dict], command: str, dtype: torch.dtype | None = None,
               partial: bool = False):
    """The rows with the run's command, date and machine, written atomically (a temporary file
    renamed over the target: a kill leaves the old file or the new one, never half of one). A
    partial run (after each prompt) goes to `<path>.partial`, so a complete file is only replaced
    by a complete run; the complete run removes it."""
    meta = {"command": command + ("  # partial" if partial else ""), "date": date.today().isoformat(),
            "machine": machine(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, **({"dtype": str(dtype).removeprefix("torch.")} if dtype else {})}
    path = Path(path)
    target = path.with_name(path.name + ".partial") if partial else path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump([{**row, **meta} for row in rows], f, indent=1)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not partial:
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
        print(f"\nwrote {len(rows)} rows to {path}")


# ---------------------------------------------------------------------------------------
# 95 % intervals

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
