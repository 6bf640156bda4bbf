"""python bench.py report: every table of docs/results.md and the README's headline and
compress-once tables, rebuilt from the committed results/*.json, so the text cannot drift from the data.

A document marks each generated block with `<!-- results/NAME.json -->` (the tables of that run,
headed by its command, date and machine), `<!-- headline -->` or `<!-- agnostic -->`, and ends it
with `<!-- end -->`;
everything between the markers is rewritten, everything outside them is left alone."""
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import table
from benchmarks.quality import accuracy_cell, pages_table, passkey_table, quality_tables, weights_table
from benchmarks.recompress import recompress_tables
from benchmarks.speed import load_table, questions_table, speed_tables, throughput_tables

ROOT = Path(__file__).parent.parent
DOCUMENTS = ("README.md", "docs/results.md", "docs/engines.md")
def run_demo(checkpoint: str | None = None) -> list[dict]:
    """The README's demo, `python generate.py --chunk 10`, in a fresh process: its output, as one row."""
    command = [sys.executable, "generate.py", "--chunk", "10", *(["--checkpoint", checkpoint] if checkpoint else [])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    return [{"bench": "demo", "metric": "stdout", "text": result.stdout}]


TABLES = {"demo": lambda rows: f"```\n{rows[0]['text'].rstrip()}\n```", "quality": quality_tables, "speed": speed_tables, "throughput": throughput_tables, "pages": pages_table,
          "questions": questions_table, "passkey": passkey_table, "recompress": recompress_tables, "load": load_table,
          "weights": weights_table}
BLOCK = re.compile(r"(<!-- (results/[\w./-]+\.json|headline|agnostic) -->\n)(.*?)(<!-- end -->)", re.S)


def rows_of(path: str) -> list[dict]:
    return json.loads((ROOT / path).read_text())


def run_tables(path: str) -> str:
    """The tables of one committed run, headed by what produced it."""
    rows = rows_of(path)
    first = rows[0]
    bench = first["command"].split()[2]  # "python bench.py <bench> ..."
    dtype = f", {first['dtype']}" if first.get("dtype") else ""
    head = (f"`{first['command']}` ({first['date']}, {first['machine']}, torch {first['torch']}, "
            f"Python {first['python']}{dtype})")
    return f"{head}\n{TABLES[bench](rows).rstrip()}\n"


HEADLINE_QUALITY = [  # (model, results file, rows that count, what they are)
    ("SmolLM2-135M", "results/quality.json", {}, "3 tasks, 1k-4k tokens"),
    ("Qwen2.5-Coder-0.5B", "results/qwen/quality-4k.json", {"setting": "aware"}, "single needle, 4k"),
]
HEADLINE_SPEED = [("int8", "results/speed-llama-int8.json"), ("bfloat16", "results/speed-llama-bfloat16.json"),
                  ("float32", "results/speed-llama-float32.json")]  # weights; each run beside llama-bench


def headline() -> str:
    """Retrieval at keep 0.1 on both models; decode tokens/s with the share of the roofline, beside llama.cpp."""
    labels = ["full", "chunkkv", "snapkv", "pyramidkv", "streaming", "h2o"]
    cells = [[model, what] + [accuracy_cell(rows_of(path), bench="retrieval", method=label,
                                            keep=1.0 if label == "full" else 0.1, **match) for label in labels]
             for model, path, match, what in HEADLINE_QUALITY]
    out = [table("Retrieval accuracy at keep 0.1, query-aware (mean [95 % interval] n=prompts)",
                 ["model", "prompts"] + labels, cells)]
    cells = []
    for weights, path in HEADLINE_SPEED:
        rows = rows_of(path)
        for llama in (r for r in rows if r.get("method") == "llama.cpp"):
            ours = {r["method"]: r for r in rows if r.get("mode") == "compiled" and r.get("batch") == 1
                    and r["prompt_tokens"] == llama["prompt_tokens"]}
            theirs = llama["decode_tokens_per_s"]
            cells.append([weights, llama["prompt_tokens"]] +
                         [f"{ours[m]['value']:.1f} ({100 * ours[m]['of_roofline']:.0f} %)" for m in ("full", "chunkkv")] +
                         [f"{theirs:.1f} ({llama['precision']})"] +
                         [f"{ours[m]['value'] / theirs:.2f}x" for m in ("full", "chunkkv")])
    out.append(table("Decode tokens/s, SmolLM2-135M, batch 1, compiled (`--compile`; in brackets: the share of the "
                     "bandwidth roofline); llama.cpp: its llama-bench on the same weights as GGUF, full cache, "
                     "run in the same minutes",
                     ["weights", "prompt tokens", "full", "chunkkv keep 0.1", "llama.cpp", "full / llama.cpp",
                      "chunkkv / llama.cpp"], cells))
    runs = [path for _, path, _, _ in HEADLINE_QUALITY] + [path for _, path in HEADLINE_SPEED]
    out.append("\nFrom " + "; ".join(f"`{path}` ({rows_of(path)[0]['date']}, {rows_of(path)[0]['machine']})"
                                     for path in runs) + ": commands and the full tables in docs/results.md.")
    return "\n".join(out).lstrip("\n") + "\n"


AGNOSTIC = [  # (model, haystack, task, results files, first holding a method's rows): compress once
    ("SmolLM2-135M", "2k prose", "single", ["results/quality-agnostic-2k.json", "results/quality_settings.json",
                                            "results/quality-global-2k.json", "results/quality-global-chunks-2k.json"]),
    ("SmolLM2-135M", "2k filler", "single", ["results/quality-filler-2k.json"]),
    ("Qwen2.5-Coder-0.5B", "4k prose", "single", ["results/qwen/quality-fast-scoring-4k.json",
                                                  "results/qwen/quality-reconstruct-4k.json",
                                                  "results/qwen/quality-4k.json", "results/qwen/quality-global-4k.json",
                                                  "results/qwen/quality-global-chunks-4k.json"]),
    ("Qwen2.5-Coder-0.5B", "4k prose", "multikey", ["results/qwen/quality-fast-scoring-4k.json",
                                                    "results/qwen/quality-global-multikey-4k.json",
                                                    "results/qwen/quality-global-chunks-4k.json"]),
    ("Qwen2.5-Coder-0.5B", "4k filler", "single", ["results/qwen/quality-filler-4k.json"]),
    ("Qwen2.5-Coder-0.5B", "8k prose", "single", ["results/qwen/quality-global-8k.json", "results/qwen/quality-8k.json"]),
    ("Qwen2.5-Coder-0.5B", "8k prose", "multikey", ["results/qwen/quality-global-multikey-8k.json",
                                                    "results/qwen/quality-fast-scoring-8k.json"]),
]
SCORING = [("4k", "results/qwen/quality-fast-scoring-4k.json"), ("8k", "results/qwen/quality-fast-scoring-8k.json")]
AGNOSTIC_LABELS = ["full", "snapkv", "chunkkv", "eg-chunkkv", "kvzip", "chunkkv-reconstruct", "eg-chunkkv-reconstruct",
                   "kvzip-global", "chunkkv-reconstruct-global", "chunkkv-reconstruct-global-c2"]


def agnostic() -> str:
    """Retrieval at keep 0.1, question-free on both scorers, question-aware ChunkKV beside."""
    columns = [("aware", "chunkkv")] + [("agnostic", label) for label in AGNOSTIC_LABELS]
    cells, runs = [], []
    for model, haystack, task, paths in AGNOSTIC:
        cells.append([model, haystack, task])
        loaded = [rows_of(path) for path in paths]  # each file read once, not once per column
        for setting, label in columns:
            match = dict(bench="retrieval", task=task, setting=setting, method=label,
                         keep=1.0 if label == "full" else 0.1)
            cells[-1].append(next((cell for cell in (accuracy_cell(rows, **match) for rows in loaded) if cell), "-"))
        runs += [(path, rows[0]["date"]) for path, rows in zip(paths, loaded) if path not in dict(runs)]
    header = ["model", "haystack", "needles", "chunkkv, aware"] + AGNOSTIC_LABELS
    out = table("Keep 0.1, compressed before the question (mean [95 % interval] n=questions); single: one needle, "
                "multikey: four, one asked each time; -reconstruct and kvzip: KVzip's scores, the others the context's "
                "last window; -global: one budget over all layers; -c2: chunks of 2 tokens", header, cells)
    timed = [(what, [r["of_prefill"] for r in rows_of(path) if r["bench"] == "scoring"]) for what, path in SCORING]
    scoring = ", ".join(f"{statistics.median(shares):.2f}x at {what} (median of {len(shares)} prompts; "
                        f"{min(shares):.2f}-{max(shares):.2f}x)" for what, shares in timed)
    runs += [(path, rows_of(path)[0]["date"]) for _, path in SCORING if path not in dict(runs)]
    return (out + f"\n\nScoring by KVzip's repeat, against Qwen's prefill of the context: {scoring}. From "
            + "; ".join(f"`{path}` ({day})" for path, day in runs)
            + ": commands and the full tables in docs/results.md.\n").lstrip("\n")


def rebuilt(text: str) -> str:
    """`text` with every marked block generated anew."""
    generated = {"headline": headline, "agnostic": agnostic}
    return BLOCK.sub(lambda m: m.group(1) + (generated[m.group(2)]() if m.group(2) in generated else
                                             run_tables(m.group(2))) + m.group(4), text)


def report(check: bool = False) -> list[str]:
    """Rebuild the marked blocks of DOCUMENTS in place (check: only compare); the documents that differ."""
    stale = []
    for name in DOCUMENTS:
        path = ROOT / name
        text = path.read_text()
        new = rebuilt(text)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    return stale
