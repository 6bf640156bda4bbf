"""Benchmarks on the default model (or --checkpoint), printed as tables and written as flat JSON rows.

    python bench.py quality   [--quick] [--checkpoint NAME] [--setting aware|agnostic|both] [--lengths N ...]
                              [--prompts N] [--out results/quality.json] [--plot accuracy.png]
    python bench.py speed     [--quick] [--checkpoint NAME] [--device cpu] [--dtype auto] [--lengths N ...] [--no-compare]
                              [--llama-bench PATH] [--out results/speed.json]
    python bench.py throughput [--quick] [--memory-gib 1] [--lengths 8000 4096] [--out results/throughput.json]
    python bench.py pages     [--quick] [--lengths 1024] [--out results/pages.json]
    python bench.py questions [--quick] [--checkpoint NAME] [--lengths N ...] [--questions 16] [--out results/questions.json]
    python bench.py passkey   [--quick] [--out results/passkey.json]
    python bench.py weights   [--quick] [--checkpoint NAME] [--out results/weights.json]
    python bench.py recompress [--quick] [--checkpoint NAME] [--parts fidelity retrieval speed] [--caps 256 512]
                              [--texts 3] [--cases 8] [--new-tokens 1024] [--out results/recompress.json]
    python bench.py load      [--checkpoint NAME] [--out results/load.json]
    python bench.py demo      [--checkpoint NAME] [--out results/demo.json]
    python bench.py report    [--check]

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
weights: int8 weights against the model's dtype (bfloat16 or float16) on the fidelity text:
perplexity, KL per token and greedy agreement.
recompress: long generation through a cache re-compressed whenever full: teacher-forced fidelity,
recall of a fact stated before many re-compressions, and decode speed.
load: peak resident memory of loading the checkpoint, in float32 and bfloat16, each in a fresh process.
demo: the README's demo, `python generate.py --chunk 10`, run in a fresh process: its output.
report: the tables of docs/results.md and the README's headline, rebuilt from results/*.json
(--check: exit 1 if the committed documents differ from what the results give).

Every run writes its rows to --out when it ends (atomically); the quality bench also writes what
it has after every prompt, to <out>.partial, so a killed run never replaces a complete file.
"""
import argparse
import os
import sys
import time
from datetime import date

import torch

from benchmarks.common import machine, write_json
from benchmarks.quality import LABELS, RECONSTRUCT, plot, run_pages, run_passkey, run_quality, run_weights
from benchmarks.recompress import run_recompress
from benchmarks.report import TABLES, report, run_demo
from benchmarks.speed import SPEED_CONFIGS, run_load, run_questions, run_speed, run_throughput
from checkpoint import CheckpointError
from chunkkv import CompressionConfig, CompressionError
from devices import auto_dtype
from generate import Recompression
from quantize import WEIGHTS, check_weights
from registry import check_device, load, resolve


LENGTHS = {  # default --lengths per named checkpoint and bench: up to the model's context
    "qwen2.5-coder-0.5b": {"quality": [1024, 4096, 8192, 16384], "speed": [4096, 8192, 16384]},
}


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["quality", "speed", "throughput", "pages", "questions", "passkey",
                                          "recompress", "weights", "load", "demo", "report"])
    parser.add_argument("--check", action="store_true", help="report: only compare the documents with the results")
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
    parser.add_argument("--methods", nargs="+", choices=[*LABELS, *(m for m in SPEED_CONFIGS if m not in LABELS)],
                        help="speed (full, chunkkv, chunkkv-reuse2, snapkv), quality (any; full always runs): "
                             "methods (default all)")
    parser.add_argument("--haystack", choices=["prose", "filler"], default="prose", help="quality: retrieval haystacks "
                        "of standard-library prose (default) or of RULER's one repeated filler sentence group")
    parser.add_argument("--batches", type=positive, nargs="+", help="speed: batch sizes (default 1 4)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="speed: also time the compiled decode step (default on)")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="speed: also time transformers' generate on the same prompt (when installed) and the "
                             "start of a compiled run in a fresh process (default on)")
    parser.add_argument("--llama-bench", default=os.environ.get("CHUNKKV_LLAMA_BENCH"),
                        help="speed: a llama.cpp llama-bench binary (default $CHUNKKV_LLAMA_BENCH): llama.cpp on "
                             "the same weights, written as GGUF, beside chunkkv (docs/results.md, Speed: how to build it)")
    parser.add_argument("--questions", type=positive, help="questions: questions asked per document (default 16)")
    parser.add_argument("--memory-gib", type=float, default=1.0, help="throughput: KV-cache memory (default 1)")
    parser.add_argument("--keeps", type=float, nargs="+", help="quality: kept fractions")
    parser.add_argument("--scorers", nargs="+", choices=["window", "reconstruct"], default=["window"],
                        help="quality, agnostic setting: window (every method) and/or reconstruct (kvzip, snapkv and "
                             "chunkkv on KVzip's repeat of the context)")
    parser.add_argument("--tasks", nargs="+", choices=["single", "multikey", "multivalue"], help="quality: retrieval tasks")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights and activations (default auto: as generate.py on --device)")
    parser.add_argument("--weights", choices=WEIGHTS, default="dtype",
                        help="the linear layers' weights: in --dtype (default) or int8 (as generate.py --weights)")
    parser.add_argument("--device", default="cpu", help="where the model and every tensor of the bench live (cpu, "
                        "cuda, cuda:N; default cpu); timers synchronize with it, and the speed bench's bandwidth and "
                        "matmul peak are the device's")
    parser.add_argument("--out", help="JSON rows (default results/<bench>.json)")
    parser.add_argument("--checkpoint", help="a checkpoint name (see generate.py --help), Hugging Face "
                        "directory or .gguf file (default: smollm2-135m)")
    parser.add_argument("--plot", help="quality: draw accuracy vs keep to this PNG (needs matplotlib)")
    parser.add_argument("--parts", nargs="+", choices=["fidelity", "retrieval", "speed"],
                        default=["fidelity", "retrieval", "speed"], help="recompress: which parts to run")
    parser.add_argument("--texts", type=int, help="recompress: fidelity texts (default 3)")
    parser.add_argument("--cases", type=int, help="recompress: retrieval cases (default 8)")
    parser.add_argument("--new-tokens", type=int, help="recompress: tokens generated for speed (default 1024)")
    parser.add_argument("--caps", type=positive, nargs="+",
                        help="recompress: cache sizes in entries for fidelity and retrieval (default 256 512)")
    return parser


def refused(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments before anything is loaded (the fix included), or None."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib: pip install matplotlib"
    if args.bench == "speed" and set(args.methods or ()) - set(SPEED_CONFIGS):
        return (f"--methods {' '.join(sorted(set(args.methods) - set(SPEED_CONFIGS)))} are not timed by the speed "
                f"bench: pass some of {' '.join(SPEED_CONFIGS)}")
    if args.bench == "quality" and set(args.methods or ()) & set(RECONSTRUCT) and "reconstruct" not in args.scorers:
        return (f"--methods {' '.join(sorted(set(args.methods) & set(RECONSTRUCT)))} score by reconstruction: "
                "add --scorers reconstruct")
    if args.llama_bench is not None and not os.access(args.llama_bench, os.X_OK):
        return (f"--llama-bench {args.llama_bench} is not an executable file: pass the path of a built "
                "llama-bench (docs/results.md, Speed), or leave it out")
    for cap in args.caps or ():  # Recompression's own check
        try:
            Recompression(CompressionConfig(), cap)
        except CompressionError as e:
            return f"--caps {cap}: {e}"
    return None


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.bench == "report":
        stale = report(check=args.check)
        verb = "differ from what results/ gives: run python bench.py report" if args.check else "rebuilt"
        print(f"{', '.join(stale)} {verb}" if stale else "the documents match results/")
        return 1 if stale and args.check else 0
    if (error := refused(args)) is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.bench in ("load", "demo"):  # measured in fresh processes: this one loads nothing
            command = "python bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
            rows = run_load(resolve(args.checkpoint)) if args.bench == "load" else run_demo(args.checkpoint)
            print(f"{command}\n{date.today()}, {machine()}, torch {torch.__version__}\n{TABLES[args.bench](rows)}")
            write_json(args.out or f"results/{args.bench}.json", rows, command)
            return 0
        device = check_device(args.device)
        if args.llama_bench and device.type != "cpu":
            raise CheckpointError("--llama-bench runs llama.cpp on the CPU, its build here: compare with --device cpu")
        dtype = auto_dtype(device, args.weights) if args.dtype == "auto" else getattr(torch, args.dtype)
        if args.bench == "weights":  # its int8 copy must run beside the model
            check_weights("int8", device, dtype)
        model, tokenizer = load(args.checkpoint, device=device, dtype=dtype, weights=args.weights)
        if device.type != "cpu":  # the benches' own tensors (prompts, probes) go where the model is
            torch.set_default_device(device)
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
    rows = run(args, model, tokenizer, lengths, command, dtype)
    print(TABLES[args.bench](rows))
    print(f"\n{args.bench} benchmark took {(time.perf_counter() - start) / 60:.1f} min")
    write_json(args.out or f"results/{args.bench}.json", rows, command, dtype)
    if args.plot and args.bench == "quality":
        plot(rows, args.plot)
    return 0


def run(args: argparse.Namespace, model, tokenizer, lengths, command: str, dtype) -> list[dict]:
    """The rows of the benchmark `args.bench` asks for."""
    if args.bench == "quality":
        settings = ("aware", "agnostic") if args.setting == "both" else (args.setting,)
        out = args.out or f"results/{args.bench}.json"
        return run_quality(model, tokenizer, args.quick, settings, lengths, args.keeps, args.tasks, args.retrieval_only,
                           args.prompts, args.ablations, args.fidelity_tokens,
                           on_case=lambda rows: write_json(out, rows, command, dtype, partial=True),
                           scorers=args.scorers, methods=args.methods, haystack=args.haystack)
    if args.bench == "speed":
        return run_speed(model, tokenizer, args.quick, lengths, args.methods, args.batches, args.compile,
                         args.checkpoint, args.compare, args.llama_bench)
    if args.bench == "throughput":
        return run_throughput(model, tokenizer, args.quick, args.memory_gib, args.lengths)
    if args.bench == "pages":
        return run_pages(model, tokenizer, args.quick, args.lengths)
    if args.bench == "questions":
        return run_questions(model, tokenizer, args.quick, args.lengths, args.questions, args.checkpoint)
    if args.bench == "recompress":
        return run_recompress(model, tokenizer, args.quick, args.caps, args.parts, args.texts, args.cases,
                              args.new_tokens)
    if args.bench == "weights":
        return run_weights(model, tokenizer, args.quick)
    return run_passkey(model, tokenizer, args.quick)


if __name__ == "__main__":
    sys.exit(main())
