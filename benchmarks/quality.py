"""Accuracy and fidelity benchmarks (python bench.py quality | pages | passkey): retrieval and
teacher-forced fidelity of every method x keep, all compressed from one prefill, with their tables
and plot; page-aligned chunks (16 against 10); the CLI's pass-key demo over seeds."""
import copy
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (Progress, bootstrap, compress, greedy, haystack_paragraphs, interval, kept_per_layer,
                               layer_scores, retrieval_case, stdlib_paragraphs, table, take_prose, wilson)
from chunkkv import CompressionConfig
from cli import PASSKEY_QUESTION, fastgen_token_ids, passkey_prompt
from contexts import Repeat, reconstruction_scores
from quantize import int8_weights
from tokenizer import REPEAT_FIRST, REPEAT_LATER, repeat_prompts, split_text


# ---------------------------------------------------------------------------------------
# quality

METHODS = {  # label -> config at a given keep
    "streaming": dict(method="streaming"), "h2o": dict(method="h2o"), "snapkv": dict(method="snapkv"),
    "pyramidkv": dict(method="pyramidkv"), "chunkkv": dict(method="chunkkv"),
    "chunkkv-per-head": dict(method="chunkkv", per_head=True), "eg-chunkkv": dict(method="eg-chunkkv"),
}


def fidelity_text(tokenizer, n_context: int, n_next: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fidelity text, standard-library prose from the middle of the docstrings whatever the
    haystack: (the context's ids [1, n_context], its continuation's [1, n_next])."""
    paragraphs = stdlib_paragraphs()
    ids = tokenizer.encode("\n".join(take_prose(paragraphs, tokenizer, n_context + n_next + 50, len(paragraphs) // 2))).ids
    return torch.tensor([ids[:n_context]]), torch.tensor([ids[n_context:n_context + n_next]])


def teacher_forced(model, logits, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] of each continuation token's prediction, fed one at a time."""
    out = [logits]
    for i in range(continuation.shape[1] - 1):
        out.append(model.decode(continuation[:, i:i + 1]))
    return torch.cat(out).float().log_softmax(-1)


def layer_sets(model, n_prompt: int) -> list[list[set]]:
    """Kept prompt positions per layer and sequence; per-head methods merged by union over KV heads."""
    return [[set(row.tolist()) - {-1} for row in kept.flatten(1)] for kept in model.kept_positions([n_prompt])]


def adjacent_jaccard(sets: list[list[set]]) -> float:
    pairs = [len(a & b) / len(a | b) for upper, lower in zip(sets, sets[1:]) for a, b in zip(upper, lower)]
    return statistics.mean(pairs)


RECONSTRUCT = {  # label -> config at a given keep, on KVzip's reconstruction scores (agnostic setting)
    "kvzip": dict(method="kvzip"), "kvzip-global": dict(method="kvzip", global_budget=True),
    "snapkv-reconstruct": dict(method="snapkv", scorer="reconstruct"),
    "chunkkv-reconstruct": dict(method="chunkkv", scorer="reconstruct"),
    "chunkkv-reconstruct-max": dict(method="chunkkv", scorer="reconstruct"),  # the max over KV heads, not the sum
    "chunkkv-reconstruct-global": dict(method="chunkkv", scorer="reconstruct", global_budget=True),
    "chunkkv-reconstruct-max-global": dict(method="chunkkv", scorer="reconstruct", global_budget=True),
    **{f"chunkkv-reconstruct{agg}-global-c{c}": dict(method="chunkkv", scorer="reconstruct", global_budget=True,
                                                     chunk_size=c)
       for agg in ("", "-max") for c in (2, 3)},  # chunks shorter than the paper's 10
    "eg-chunkkv-reconstruct": dict(method="eg-chunkkv", scorer="reconstruct"),
}


LABELS = ["full", *METHODS, "fastgen", *RECONSTRUCT]  # every row's method label, in table order


def reconstructed(model, captured, tokens: torch.Tensor, repeat: Repeat, room: int) -> tuple[list, float]:
    """KVzip's scores of the context `tokens` (contexts.reconstruction_scores) from the full caches filled
    from a captured prefill: (each layer's [B, Hkv, T], the seconds the repeats and scoring took)."""
    n_repeat = max(len(ids) for _, _, ids in repeat.prompts(tokens[0].tolist()))
    compress(model, captured, tokens, CompressionConfig(method="full"), max(room, n_repeat))
    start = time.perf_counter()
    scores = reconstruction_scores(model, tokens, repeat, CompressionConfig().n_sinks)
    return scores, time.perf_counter() - start


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
                on_case=None, scorers=("window",), methods=None, haystack="prose") -> list[dict]:
    """Rows of every retrieval prompt x method x keep (and setting), then fidelity, overlap and the
    ablations. `prompts` per length and task (default: one per depth), their needles' depths
    cycling through 0, 0.25, ..., 1; `on_case(rows)` after each prompt (partial results). With the
    scorer "reconstruct", the agnostic setting also runs RECONSTRUCT's methods on KVzip's scores of
    the context, scored once per prompt, and times that scoring against the prefill. `methods`: only
    these labels and full (default all); `haystack`: prose or filler (haystack_paragraphs), fidelity is on prose."""
    paragraphs = haystack_paragraphs(haystack)
    rng = random.Random(0)
    lengths = lengths or ([1024] if quick else [1024, 2048, 4096])
    depths = [0.25, 0.75] if quick else [0.0, 0.25, 0.5, 0.75, 1.0]
    prompts = prompts or len(depths)
    tasks = tasks or ["single", "multikey", "multivalue"]
    keeps = keeps or ([0.1] if quick else [0.05, 0.1, 0.2, 0.3])  # quick: one keep, as both settings run
    stop = set(tokenizer.encode("\n").ids) | {i for i in (tokenizer.token_to_id("<|endoftext|>"),
                                                         tokenizer.token_to_id("<|im_end|>")) if i is not None}
    configs = quality_configs(keeps, fastgen_token_ids(tokenizer))
    if quick or retrieval_only or not ablations:
        configs = [c for c in configs if c[0] == "main"]
    wanted = None if methods is None else {"full", *methods}  # full: fidelity's reference
    configs = [c for c in configs if wanted is None or c[1] in wanted or c[0] != "main"]
    rows = []

    def evaluate(bench, **fields):
        rows.append({"bench": bench, **fields})

    encode = lambda text: torch.tensor([tokenizer.encode(text).ids])  # noqa: E731

    cases = [(task, n, i) for n in lengths for task in tasks for i in range(prompts)]
    progress = Progress(len(cases) + (0 if retrieval_only else 1), "quality")
    for task, n_tokens, prompt in cases:
        depth = depths[prompt % len(depths)]
        context, questions, max_new = retrieval_case(task, paragraphs, tokenizer, n_tokens, depth, rng)
        common = dict(task=task, context=n_tokens, depth=depth, prompt=prompt, metric="accuracy")
        if "aware" in settings:  # every question in its own prompt: prefilled and compressed with it
            for asked, (question, answers) in enumerate(questions):
                tokens = encode(context + question)
                logits, captured = model.capture(tokens)
                scores = {}
                for bench, label, keep, config in configs:
                    key = (config.method, config.per_head)
                    if key not in scores:  # score once per method: every keep, reuse and chunk size selects from it
                        scores[key] = layer_scores(config, captured)
                    compress(model, captured, tokens, config, max_new, scores[key])
                    answer = tokenizer.decode(greedy(model, logits, max_new, stop))
                    evaluate("retrieval" if bench == "main" else f"{bench}-ablation", setting="aware", method=label,
                             keep=keep, question=asked, prompt_tokens=tokens.shape[1],
                             value=sum(a in answer for a in answers) / len(answers), **common)
        if "agnostic" in settings:  # the context alone, compressed once; every question extends that cache
            # tokenized as the aware prompts are: context + question ids are the one prompt's (no BOS between)
            repeating = "reconstruct" in scorers  # KVzip's repeat prompts, cut as the questions are
            encoded, asks = split_text(tokenizer, context, [question for question, _ in questions] +
                                       ([f"\n\n{REPEAT_FIRST}", f"\n\n{REPEAT_LATER}"] if repeating else []), True)
            repeat, asks = (Repeat(*repeat_prompts(tokenizer, asks[-2:], None)), asks[:-2]) if repeating else (None, asks)
            tokens, asks = torch.tensor([encoded.ids]), [torch.tensor([ids]) for ids in asks]
            room = max(ask.shape[1] for ask in asks) + max_new
            start = time.perf_counter()
            _, captured = model.capture(tokens)
            prefill_seconds, scores = time.perf_counter() - start, {}
            agnostic = [c for c in configs if c[0] == "main" and ("window" in scorers or c[1] == "full")]
            if repeating:
                scores["reconstruct"], seconds = reconstructed(model, captured, tokens, repeat, room)
                evaluate("scoring", **{**common, "metric": "reconstruct_seconds"}, value=seconds,
                         prefill_seconds=prefill_seconds, of_prefill=seconds / prefill_seconds)
                agnostic += [("main", label, keep, CompressionConfig(keep=keep, **kw))
                             for label, kw in RECONSTRUCT.items() for keep in keeps if wanted is None or label in wanted]
            for bench, label, keep, config in agnostic:
                key = (config.method, config.per_head) if config.scoring == "window" else "-max" in label
                if key not in scores:  # per-layer selectors sum reconstruction scores over KV heads, or take the max
                    scores[key] = (layer_scores(config, captured) if config.scoring == "window" else
                                   [s.amax(dim=1) for s in scores["reconstruct"]] if key else scores["reconstruct"])
                compress(model, captured, tokens, config, room, scores[key])
                compressed = model.snapshot()
                for asked, ((_, answers), ask) in enumerate(zip(questions, asks)):
                    model.restore(compressed)
                    answer = tokenizer.decode(greedy(model, model.extend(ask)[:, -1], max_new, stop))
                    evaluate("retrieval", setting="agnostic", method=label, keep=keep, question=asked,
                             prompt_tokens=tokens.shape[1] + ask.shape[1],
                             value=sum(a in answer for a in answers) / len(answers), **common)
        progress.step(f"{task} {n_tokens} tokens, depth {depth:.2f}")
        if on_case is not None:
            on_case(rows)
    if retrieval_only:
        return rows

    # fidelity on real text: compress a long prose prefix, teacher-force its continuation
    n_context, n_next = (512, continuation or 32) if quick else (2048, continuation or 256)
    tokens, continuation = fidelity_text(tokenizer, n_context, n_next)
    logits, captured = model.capture(tokens)
    reference = None
    for bench, label, keep, config in configs:
        compress(model, captured, tokens, config, n_next)
        kept = kept_per_layer(model, n_context)
        logprobs = teacher_forced(model, logits, continuation)
        reference = logprobs if label == "full" else reference
        nll = -logprobs.gather(1, continuation[0, :, None]).mean()
        kl = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1).mean()
        common = dict(method=label, keep=keep, prompt_tokens=n_context, continuation_tokens=n_next)
        name = "fidelity" if bench == "main" else f"{bench}-ablation"
        evaluate(name, metric="perplexity", value=math.exp(nll), **common)
        evaluate(name, metric="kl_to_full", value=float(kl), **common)
        evaluate(name, metric="kept_fraction", value=sum(kept) / (n_context * model.args.n_layers), **common)
        if bench != "chunk":
            evaluate("layer-overlap" if bench == "main" else f"{bench}-ablation", metric="adjacent_jaccard",
                     value=adjacent_jaccard(layer_sets(model, n_context)), **common)
        if bench == "reuse" or label == "chunkkv" and keep == 0.1:  # scoring time: no precomputed scores here
            seconds = []
            for _ in range(3):
                seconds.append(compress(model, captured, tokens, config, n_next))
            evaluate("reuse-ablation", metric="compress_seconds", value=statistics.median(seconds), **common)
    progress.step("fidelity")
    return rows


def mean_of(rows: list[dict], **match) -> float:
    values = [r["value"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return statistics.mean(values) if values else float("nan")


def accuracy_cell(rows: list[dict], **match) -> str:
    """'0.85 [0.71, 0.93] n=40': mean accuracy of the matching rows, 95 % interval, number of prompts."""
    values = [r["value"] for r in rows if r["metric"] == "accuracy" and all(r.get(k) == v for k, v in match.items())]
    if not values:
        return ""
    low, high = interval(values)
    return f"{statistics.fmean(values):.2f} [{low:.2f}, {high:.2f}] n={len(values)}"


def paired_table(rows: list[dict], ours_label: str = "chunkkv", labels=None) -> str:
    """`ours_label` (ChunkKV) minus each of `labels` (the other methods) at the same keep (full: all
    kept; fastgen: its own choice), over the same prompts, with a 95 % paired-bootstrap interval: a
    difference is resolved when its interval excludes 0."""
    rows = [r for r in rows if r["bench"] == "retrieval" and r["metric"] == "accuracy"]
    prompt = lambda r: (r["task"], r["context"], r.get("prompt", r["depth"]), r.get("question", 0))  # noqa: E731
    keeps = sorted({r["keep"] for r in rows if r["keep"] not in (None, 1.0)})
    cells = []
    for keep in keeps:
        ours = {prompt(r): r["value"] for r in rows if r["method"] == ours_label and r["keep"] == keep}
        for label in labels or ["full"] + [m for m in METHODS if m != "chunkkv"] + ["fastgen"]:
            theirs_keep = 1.0 if label == "full" else None if label == "fastgen" else keep
            theirs = {prompt(r): r["value"] for r in rows if r["method"] == label and r["keep"] == theirs_keep}
            diffs = [ours[p] - theirs[p] for p in ours if p in theirs]
            if not diffs:
                continue
            low, high = bootstrap(diffs)
            cells.append([keep, label, f"{statistics.fmean(diffs):+.2f} [{low:+.2f}, {high:+.2f}]", len(diffs),
                          "yes" if low > 0 or high < 0 else "no"])
    if not cells:
        return ""  # no method beside ours in this run
    return table(f"{ours_label} minus each method, same prompts (95 % paired bootstrap)",
                 [f"{ours_label} keep", "vs", "difference", "prompts", "resolved"], cells)


def settings_table(rows: list[dict]) -> str:
    """Retrieval accuracy per method x keep x setting, with the number of prompts and a 95 %
    Wilson interval; binary tasks only (single, multikey)."""
    rows = [r for r in rows if r["bench"] == "retrieval" and r.get("setting") and r["task"] != "multivalue"]
    if not rows:
        return "\n(no single or multikey prompts ran: no table by setting)"
    if len(tasks := sorted({r["task"] for r in rows})) > 1:  # one table per task: pooled, multikey's 4 questions outweigh
        return "\n".join(settings_table([r for r in rows if r["task"] == task]) for task in tasks)
    settings = [s for s in ("aware", "agnostic") if any(r["setting"] == s for r in rows)]
    keeps = sorted({r["keep"] for r in rows if r["keep"] not in (None, 1.0)})
    labels = [label for label in LABELS if any(r["method"] == label for r in rows)]
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
    lengths = sorted({r["context"] for r in rows})
    return table(f"Retrieval accuracy by setting ({', '.join(tasks)}; ~{', '.join(map(str, lengths))} tokens)", header, cells)


def quality_tables(rows: list[dict]) -> str:
    out = [settings_table(rows)] if any(r.get("setting") == "agnostic" for r in rows) else []
    if timed := [r for r in rows if r["bench"] == "scoring"]:
        shares = [r["of_prefill"] for r in timed]
        out.append(f"\nreconstruction scoring (KVzip's repeat, every block): {statistics.median(shares):.2f}x the "
                   f"context's prefill (median; {min(shares):.2f}-{max(shares):.2f}x over {len(shares)} prompts)")
        agnostic = [r for r in rows if r.get("setting") == "agnostic"]
        if paired := paired_table(agnostic, "chunkkv-reconstruct", [label for label in ["full", *METHODS, *RECONSTRUCT]
                                                                    if label != "chunkkv-reconstruct"]):
            out.append(paired)
    rows = [r for r in rows if r.get("setting", "aware") == "aware"]  # the tables below: query-aware
    if not any(r["bench"] == "retrieval" for r in rows):
        return "\n".join(out)
    out.append(aware_tables(rows))
    return "\n".join(out)


def aware_tables(rows: list[dict]) -> str:
    keeps = sorted({r["keep"] for r in rows if r["bench"] == "retrieval" and r["keep"] not in (None, 1.0)})
    labels = [label for label in ["full", *METHODS, "fastgen"] if any(r["method"] == label for r in rows)]
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
        logits, captured = model.capture(tokens)
        scores = layer_scores(PAGE_CONFIGS["chunkkv-c10"], captured)  # chunk size does not change the scores
        for label, config in PAGE_CONFIGS.items():
            compress(model, captured, tokens, config, max_new, scores if label != "full" else None)
            answer = tokenizer.decode(greedy(model, logits, max_new, stop))
            rows.append({"bench": "pages", "metric": "accuracy", "method": label, "task": task, "context": n_tokens,
                         "depth": depth, "prompt_tokens": tokens.shape[1], "value": float(answers[0] in answer)})
        progress.step(f"{task} {n_tokens} tokens, depth {depth}")
    n_context, n_next = (512, 32) if quick else (1024, 128)
    tokens, continuation = fidelity_text(tokenizer, n_context, n_next)
    logits, captured = model.capture(tokens)
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
    hits = {label: [r["value"] for r in rows if r["metric"] == "accuracy" and r["method"] == label]
            for label in PAGE_CONFIGS}  # every label answers the same prompts, in the same order
    fidelity = {r["method"]: r for r in rows if r["metric"] == "fidelity"}
    kl = {label: torch.tensor(fidelity[label]["kl_per_token"]) for label in PAGE_CONFIGS}

    def normal(x):  # normal interval of the mean over continuation tokens
        half = 1.96 * x.std() / math.sqrt(len(x))
        return x.mean() - half, x.mean() + half

    cells = []
    for label in PAGE_CONFIGS:
        low, high = wilson(sum(hits[label]), len(hits[label]))
        kl_low, kl_high = normal(kl[label])
        cells.append([label, f"{sum(hits[label]):.0f}/{len(hits[label])} [{low:.2f}, {high:.2f}]",
                      f"{math.exp(statistics.mean(fidelity[label]['nll_per_token'])):.2f}",
                      f"{kl[label].mean():.3f} [{kl_low:.3f}, {kl_high:.3f}]"])
    c10, c16 = hits["chunkkv-c10"], hits["chunkkv-c16"]
    diff = kl["chunkkv-c16"] - kl["chunkkv-c10"]  # same tokens: a paired difference
    low, high = normal(diff)
    return (table("Page-aligned chunks (keep 0.1, query-aware retrieval single + multikey; 95 % intervals)",
                  ["method", "retrieval hits [Wilson]", "perplexity", "KL to full per token [normal]"], cells)
            + f"\nchunk 16 vs 10, same prompts: {sum(a > b for a, b in zip(c16, c10))} answered by chunk 16 only, "
              f"{sum(a > b for a, b in zip(c10, c16))} by chunk 10 only; "
              f"KL difference per token {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]\n")


# ---------------------------------------------------------------------------------------
# the pass-key demo over seeds

def run_passkey(model, tokenizer, quick: bool) -> list[dict]:
    """The CLI's pass-key demo (chunkkv, chunk 10, window 32) over seeds: does the answer hold
    the key, with the question in the prompt (aware) or appended after compression (agnostic)?"""
    seeds, keeps = (range(1), [0.1]) if quick else (range(5), [0.1, 0.2, 0.3])
    encode = lambda text: torch.tensor([tokenizer.encode(text).ids])  # noqa: E731
    rows, progress = [], Progress(len(seeds), "passkey")
    for seed in seeds:
        context, key = passkey_prompt(seed=seed, question=False)
        encoded, (question,) = split_text(tokenizer, context, [PASSKEY_QUESTION], True)
        question = torch.tensor([question])
        for setting in ("aware", "agnostic"):
            tokens = encode(context + PASSKEY_QUESTION) if setting == "aware" else torch.tensor([encoded.ids])
            room = 16 + (0 if setting == "aware" else question.shape[1])
            logits, captured = model.capture(tokens)
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
# int8 weights against the model's own dtype

def run_weights(model, tokenizer, quick: bool) -> list[dict]:
    """Fidelity of int8 weights (quantize.int8_weights, on a copy) to the model in its own dtype, on the
    fidelity text with a full cache: per continuation token, each model's negative log-likelihood, the
    KL of int8's next-token distribution to the dtype model's, and whether their greedy tokens agree."""
    n_context, n_next = (512, 32) if quick else (2048, 256)
    tokens, continuation = fidelity_text(tokenizer, n_context, n_next)
    logprobs = {}
    for weights, m in (("dtype", model), ("int8", int8_weights(copy.deepcopy(model)))):
        logits, captured = m.capture(tokens)
        compress(m, captured, tokens, CompressionConfig(method="full"), n_next)
        logprobs[weights] = teacher_forced(m, logits, continuation)  # [n_next, vocab]
    kl = F.kl_div(logprobs["int8"], logprobs["dtype"], log_target=True, reduction="none").sum(-1)
    agree = logprobs["int8"].argmax(-1) == logprobs["dtype"].argmax(-1)
    common = dict(bench="weights", prompt_tokens=n_context, continuation_tokens=n_next)
    rows = [{**common, "weights": w, "metric": "nll_per_token", "values": (-lp.gather(1, continuation[0, :, None]))[:, 0].tolist()}
            for w, lp in logprobs.items()]
    return rows + [{**common, "weights": "int8", "metric": "kl_to_dtype", "values": kl.tolist()},
                   {**common, "weights": "int8", "metric": "greedy_agrees", "values": agree.float().tolist()}]


def weights_table(rows: list[dict]) -> str:
    values = {(r["weights"], r["metric"]): r["values"] for r in rows}
    cells = []
    for weights in ("dtype", "int8"):
        nll = values[weights, "nll_per_token"]
        line = [weights, f"{math.exp(statistics.fmean(nll)):.2f} [{', '.join(f'{math.exp(x):.2f}' for x in bootstrap(nll))}]"]
        for metric in ("kl_to_dtype", "greedy_agrees"):
            got = values.get((weights, metric))
            line.append(f"{statistics.fmean(got):.4f} [{', '.join(f'{x:.4f}' for x in interval(got))}]" if got else "-")
        cells.append(line)
    n = rows[0]
    return table(f"int8 weights against the model's dtype: {n['continuation_tokens']} teacher-forced tokens after "
                 f"{n['prompt_tokens']}, full cache (95 % bootstrap intervals over tokens)",
                 ["weights", "perplexity", "KL to dtype (nats/token)", "greedy token agrees"], cells)
