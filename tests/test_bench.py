"""The benchmarks' own machinery, without a model: the intervals every accuracy cell carries, the
paired tables, results written atomically, the refusals of bench.py, and the documents' tables
generated from the committed results."""
import json
import random
import re
import statistics

import pytest
import torch

import bench
from benchmarks import common, quality, speed
from conftest import ROOT, byte_tokenizer, write_tiny_gguf


# ---------------------------------------------------------------------------------------
# The intervals every accuracy cell carries

@pytest.mark.parametrize("k, n, expected", [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)),
                                            (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))])
def test_wilson_matches_published_values(k, n, expected):
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
    assert common.wilson(k, n) == pytest.approx(expected, abs=1e-4)


def test_interval_is_wilson_for_0_1_scores_and_bootstrap_otherwise():
    scores = [1.0] * 30 + [0.0] * 10
    assert common.interval(scores) == common.wilson(30, 40)
    partial = [0.25, 0.5, 1.0, 0.75] * 10  # multivalue: a share of the four values
    low, high = common.interval(partial)
    assert low < statistics.fmean(partial) < high and high - low < 0.2
    assert common.bootstrap([0.5] * 8) == (0.5, 0.5)


def retrieval_rows(values: dict[str, list[float]]) -> list[dict]:
    return [{"bench": "retrieval", "metric": "accuracy", "method": method, "keep": 1.0 if method == "full" else 0.1,
             "task": "single", "context": 1024, "depth": 0.0, "prompt": i, "value": value}
            for method, scores in values.items() for i, value in enumerate(scores)]


def test_paired_table_pairs_prompts_and_says_what_is_resolved():
    # SnapKV fails the ten prompts ChunkKV finds, and finds none else: +0.50, resolved;
    # H2O fails ten other prompts: the means are equal (0.00, unresolved) though no prompt agrees
    chunk, snap, h2o = [1.0] * 10 + [0.0] * 10, [0.0] * 20, [0.0] * 10 + [1.0] * 10
    text = quality.paired_table(retrieval_rows({"chunkkv": chunk, "snapkv": snap, "h2o": h2o, "full": [1.0] * 20}))
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| 0.1")}
    low, high = (float(x) for x in lines["snapkv"].split("[")[1].split("]")[0].split(","))
    assert 0.2 < low < 0.35 and 0.65 < high < 0.8  # about 0.5 -+ 1.96 * 0.5 / sqrt(20)
    assert "+0.50 [" in lines["snapkv"] and lines["snapkv"].rstrip(" |").endswith("yes")
    assert "+0.00 [" in lines["h2o"] and lines["h2o"].rstrip(" |").endswith("no")
    assert "-0.50 [" in lines["full"] and "| 20 " in lines["full"]
    assert quality.accuracy_cell(retrieval_rows({"chunkkv": chunk}), method="chunkkv") == "0.50 [0.30, 0.70] n=20"


def test_the_table_by_setting_keeps_tasks_apart_and_a_run_without_a_pair_has_no_paired_table():
    single = [dict(r, setting="agnostic") for r in retrieval_rows({"kvzip": [1.0] * 10})]
    multikey = [dict(r, setting="agnostic", task="multikey", question=q) for r in retrieval_rows({"kvzip": [0.0] * 10})
                for q in range(4)]
    text = quality.settings_table(single + multikey)
    tables = {line.split("(")[1].split(";")[0]: line for line in text.splitlines() if line.startswith("Retrieval")}
    assert set(tables) == {"single", "multikey"}
    assert "1.00 [0.72, 1.00] n=10" in text and "0.00 [0.00, 0.09] n=40" in text and "n=50" not in text
    assert quality.paired_table(single, "chunkkv-reconstruct") == ""


def test_pages_table_pairs_the_two_chunk_sizes():
    # chunk 16 answers prompts 0-2 that chunk 10 misses, chunk 10 answers prompt 3 only; over the
    # continuation, chunk 16's KL is chunk 10's + 0.05 on every token: a paired difference of +0.05
    c10, c16 = [0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]
    rows = [{"metric": "accuracy", "method": method, "value": value}
            for method, hits in (("full", [1.0] * 5), ("chunkkv-c10", c10), ("chunkkv-c16", c16)) for value in hits]
    kl = [0.1, 0.3, 0.2, 0.6]
    rows += [{"metric": "fidelity", "method": method, "kl_per_token": [x + shift for x in kl], "nll_per_token": [1.0] * 4}
             for method, shift in (("full", -0.1), ("chunkkv-c10", 0.0), ("chunkkv-c16", 0.05))]
    text = quality.pages_table(rows)
    assert "3 answered by chunk 16 only, 1 by chunk 10 only" in text
    assert "KL difference per token +0.050 [+0.050, +0.050]" in text


def test_bench_refuses_lengths_beyond_the_context_and_bad_counts(tmp_path, capsys):
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)  # context 64
    assert bench.main(["quality", "--checkpoint", str(tiny), "--lengths", "1024"]) == 2
    assert "error: --lengths 1024 does not fit the model's context of 64 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench.main(["quality", "--prompts", "0"])
    assert exit_.value.code == 2 and "'0' is not a whole number >= 1" in capsys.readouterr().err
    assert bench.main(["recompress", "--caps", "512", "40", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == ("error: --caps 40: re-compression keeps 30 entries in a cache of 40: it needs "
                                       "the observation window (32) < budget < cache budget; raise the cache budget or lower the budget\n")
    assert not (tmp_path / "r.json").exists()
    assert bench.main(["speed", "--methods", "kvzip"]) == 2
    assert "error: --methods kvzip are not timed by the speed bench" in capsys.readouterr().err
    assert bench.main(["quality", "--methods", "chunkkv", "kvzip"]) == 2
    assert "error: --methods kvzip score by reconstruction: add --scorers reconstruct" in capsys.readouterr().err


def test_filler_haystacks_hold_only_rulers_sentences_and_the_needles():
    tokenizer = byte_tokenizer()
    for task, n_needles in [("single", 1), ("multikey", 4)]:
        context, questions, _ = common.retrieval_case(task, common.haystack_paragraphs("filler"), tokenizer, 600, 0.5,
                                                      random.Random(0))
        lines = context.removeprefix(common.INTRO).split("\n")
        needles = [line for line in lines if line != common.FILLER]
        assert len(needles) == n_needles and all(line.startswith("One of the special magic numbers") for line in needles)
        assert lines.count(common.FILLER) >= 4 and len(questions) == n_needles


@pytest.mark.parametrize("scorers, methods", [(["window", "reconstruct"], ["chunkkv", "kvzip"]),
                                              (["reconstruct"], ["kvzip"])])  # full is no scorer's: it runs on either
def test_quality_runs_only_the_methods_asked_for_and_full(bench_checkpoint, tmp_path, scorers, methods):
    out = tmp_path / "q.json"
    assert bench.main(["quality", "--quick", "--retrieval-only", "--lengths", "256", "--tasks", "single", "--setting",
                       "agnostic", "--scorers", *scorers, "--haystack", "filler", "--methods", *methods,
                       "--checkpoint", bench_checkpoint, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows if r["bench"] == "retrieval"} == {"full", *methods}
    assert "--haystack filler" in rows[0]["command"]


def test_bench_refuses_a_device_it_cannot_run_on(capsys):
    cases = [("meta", "device meta holds no data"), ("gpu", "unknown device 'gpu'")]
    cases += [("cuda", "device cuda, but this torch sees no cuda device")] if not torch.cuda.is_available() else []
    for device, message in cases:
        assert bench.main(["speed", "--quick", "--device", device]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")


def test_bench_timers_synchronize_with_the_device_before_and_after(monkeypatch):
    events = []
    monkeypatch.setattr(speed, "synchronize", lambda device: events.append(("sync", device.type)))
    speed.median_seconds(lambda: events.append("run"), 2)
    assert events == [("sync", "cpu"), "run", ("sync", "cpu")] * 2


# ---------------------------------------------------------------------------------------
# Results on disk: atomic, and a partial run never replaces a complete file

def test_results_are_written_atomically_and_partial_runs_go_beside_them(tmp_path, monkeypatch):
    out = tmp_path / "results" / "quality.json"
    common.write_json(out, [{"value": 1}], "python bench.py quality")
    complete = out.read_text()
    common.write_json(out, [{"value": 2}], "python bench.py quality", partial=True)  # after a prompt of a run
    assert out.read_text() == complete
    partial = json.loads(out.with_name("quality.json.partial").read_text())
    assert partial[0]["value"] == 2 and partial[0]["command"] == "python bench.py quality  # partial"

    def killed_halfway(rows, f, **kwargs):
        f.write('[{"val')
        raise KeyboardInterrupt
    monkeypatch.setattr(common.json, "dump", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        common.write_json(out, [{"value": 3}], "python bench.py quality")
    monkeypatch.undo()
    assert out.read_text() == complete  # the old file, whole; no temporary file left
    assert sorted(p.name for p in out.parent.iterdir()) == ["quality.json", "quality.json.partial"]
    common.write_json(out, [{"value": 4}], "python bench.py quality")  # the run completes
    assert json.loads(out.read_text())[0]["value"] == 4 and not out.with_name("quality.json.partial").exists()


# ---------------------------------------------------------------------------------------
# The documents' figures are generated from results/

def test_the_documents_tables_are_what_the_committed_results_give():
    from benchmarks.report import report

    assert report(check=True) == [], "run: python bench.py report"


def test_a_figure_typed_over_in_a_generated_block_is_found():
    from benchmarks.report import rebuilt

    text = (ROOT / "docs" / "results.md").read_text()
    start = text.index("<!-- results/throughput.json -->")
    figure = text[start:].split("| full ")[1].split("|")[3]  # the full cache's max batch, as generated
    tampered = text[:start] + text[start:].replace(figure, " 999 ", 1)
    assert tampered != text and rebuilt(tampered) == text


# ---------------------------------------------------------------------------------------
# The GGUF files the llama.cpp comparison writes: the measured model, in each precision

@pytest.mark.parametrize("precision", ["F32", "BF16", "Q8_0"])
def test_the_gguf_written_for_llama_cpp_is_the_model(tiny_dir, tmp_path, precision):
    """Read back by chunkkv's GGUF loader (itself checked against transformers) and, in F32, by
    transformers' own GGUF import: the logits of the model written, to the precision's round-off."""
    import gguf
    import transformers
    from tokenizers import Tokenizer

    import checkpoint
    from benchmarks import llama_cpp
    model, reference = checkpoint.load(tiny_dir)[0], checkpoint.load(tiny_dir)[0]
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    path = llama_cpp.write_gguf(model, tokenizer, tmp_path / f"m-{precision}.gguf", precision)
    qtype = gguf.GGMLQuantizationType[precision]
    for w in reference.parameters():  # a plain reference: each matrix rounded to the precision and back
        if w.dim() == 2:
            w.data = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype).copy())
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, written = reference(tokens), checkpoint.load(path)[0](tokens)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds["blk.0.attn_q.weight"] == precision and kinds["blk.0.attn_norm.weight"] == "F32"
    assert torch.allclose(written, expected, atol=1e-5)
    if precision == "F32":
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(hf(tokens).logits, expected, atol=1e-4)


FAKE_LLAMA_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
open({log!r}, "a").write(json.dumps(args) + "\\n")
assert open(value("-m"), "rb").read(4) == b"GGUF"
n_prompt, n_gen = int(value("-p")), int(value("-n"))
rate = 100.0 if n_gen else 1000.0
print(json.dumps([{{"n_prompt": n_prompt, "n_gen": n_gen, "n_depth": int(value("-d")) if "-d" in args else 0,
                    "avg_ts": rate, "stddev_ts": 1.0, "samples_ts": [rate]}}]))
"""


@pytest.mark.parametrize("weights, precision", [(["--dtype", "float32"], "F32"), (["--dtype", "bfloat16"], "BF16"),
                                                (["--dtype", "bfloat16", "--weights", "int8"], "Q8_0")])
def test_the_speed_bench_runs_llama_bench_on_the_same_weights_and_prints_the_ratio(tiny_dir, tmp_path, capsys,
                                                                                   weights, precision):
    """A stand-in for llama-bench that prints llama-bench's JSON (a list of tests with n_prompt,
    n_gen, n_depth, avg_ts, stddev_ts: tools/llama-bench/llama-bench.cpp's json_printer). llama.cpp
    runs the precision that faces chunkkv's weights: F32, BF16, or Q8_0 beside int8."""
    import sys
    fake, log = tmp_path / "llama-bench", tmp_path / "calls.jsonl"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    out = tmp_path / "speed.json"
    assert bench.main(["speed", "--checkpoint", str(tiny_dir), "--lengths", "64", "--methods", "full", "--batches", "1",
                       "--no-compile", "--no-compare", *weights, "--llama-bench", str(fake), "--out", str(out)]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c[c.index("-p") + 1], c[c.index("-n") + 1], c[c.index("-m") + 1].rsplit("-", 1)[1]) for c in calls] == [
        ("0", "16", f"{precision}.gguf"), ("64", "0", f"{precision}.gguf")]
    assert all(c[c.index("-t") + 1] == str(torch.get_num_threads()) for c in calls)
    assert [c[c.index("-d") + 1] for c in calls if "-d" in c] == ["64"]  # decode after the same context
    rows = [r for r in json.loads(out.read_text()) if r.get("method") == "llama.cpp"]
    assert [(r["precision"], r["decode_tokens_per_s"], r["prefill_tokens_per_s"]) for r in rows] == [
        (precision, 100.0, 1000.0)]
    ours = next(r for r in json.loads(out.read_text()) if r.get("mode") == "eager")["value"]
    assert re.search(rf"\| {precision} +\| {ours:.1f} eager +\| 100\.0 ± 1\.0 +\| {ours / 100:.2f}x",
                     capsys.readouterr().out)


def test_without_llama_bench_there_is_no_llama_cpp_column(tmp_path):
    rows = [{"metric": "memory_bandwidth_gb_s", "value": 1.0}, {"metric": "gemm_peak_gflop_s", "value": 1.0},
            {"metric": "peak_rss_mib_so_far", "value": 1.0}]
    assert "llama.cpp" not in speed.speed_tables(rows)
