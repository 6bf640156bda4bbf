"""Tests for ragged batches: prompts of different lengths in one batch, each row compressed
alone with its own budget and window. The oracle is each row's batch-of-one run. Tiny random
models only."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkkv import CompressionConfig, CompressionError
from conftest import EVERY_METHOD, assert_user_error, cli, tiny_model
from generate import PromptError, batch_prompts, generate, prefill_and_compress

torch.set_grad_enabled(False)

LENGTHS = (150, 97, 64, 41)  # every row past the window and its budget
CONFIGS = [(label, CompressionConfig(keep=None if label in ("full", "fastgen") else 0.3, window=8, **kw))
           for label, kw in EVERY_METHOD]
CONFIGS.append(("chunkkv-reuse2", CompressionConfig(keep=0.3, window=8, reuse=2)))
CONFIGS.append(("pyramidkv-reuse2", CompressionConfig(method="pyramidkv", keep=0.3, window=8, reuse=2)))


def random_rows(lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def compress(model, prompt, config: CompressionConfig, room: int, lengths=None):
    """prefill_and_compress a batch as generate takes it: (last logits, the record, each layer's kept positions)."""
    prompt, lengths = batch_prompts(prompt, lengths, model)
    logits, prefilled = prefill_and_compress(model, prompt, lengths, config, room)
    return logits, prefilled, model.kept_positions(lengths)


def forced(model, prompt, config: CompressionConfig, tokens: torch.Tensor):
    """Prefill and compress `prompt`, then teacher-force `tokens` [B, n]: (logits [B, n + 1, vocab]
    after the prompt and after each token, the prefill's record, each layer's kept positions)."""
    logits, stats, positions = compress(model, prompt, config, tokens.shape[1] + 1)
    out = [logits]
    for step in range(tokens.shape[1]):
        out.append(model.decode(tokens[:, step:step + 1]))
    return torch.stack(out, dim=1), stats, positions


def own_positions(positions: torch.Tensor) -> list[list[int]]:
    """One row's kept positions without the -1 padding: a list per KV head (or one list)."""
    rows = positions[None] if positions.dim() == 1 else positions  # [N] or [Hkv, N]
    return [[p for p in row.tolist() if p >= 0] for row in rows]


@pytest.mark.parametrize("label, config", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_row_equals_its_batch_of_one_run(label, config):
    model = tiny_model()
    rows = random_rows(LENGTHS)
    alone = [generate(model, torch.tensor([row]), config, max_new_tokens=6).tokens for row in rows]
    together = generate(model, rows, config, max_new_tokens=6).tokens
    assert torch.equal(together, torch.cat(alone)), label  # the same greedy tokens
    ragged_logits, stats, ragged_positions = forced(model, rows, config, together)
    assert all(cache.length.tolist() == [n + 6 for n in LENGTHS] for cache in model.caches())  # per row
    ragged_used = [cache.used.tolist() for cache in model.caches()]
    for i, row in enumerate(rows):
        logits, row_stats, positions = forced(model, torch.tensor([row]), config, alone[i])
        torch.testing.assert_close(ragged_logits[i], logits[0], rtol=1e-5, atol=1e-5)  # float32 round-off
        for ragged, single in zip(ragged_positions, positions):  # the same kept positions, every layer
            assert own_positions(ragged[i]) == own_positions(single[0])
        assert stats.kept[i] == row_stats.kept[0]
        assert [used[i] for used in ragged_used] == [int(cache.used[0]) for cache in model.caches()]  # slots as alone
        if label in ("chunkkv", "streaming", "snapkv", "h2o"):  # each row's own keep x length
            assert stats.kept[i] == [round(0.3 * len(row))] * model.args.n_layers


def test_padded_tensor_with_lengths_equals_lists_and_padding_is_never_read():
    model = tiny_model()
    config = CompressionConfig(keep=0.3, window=8)
    rows = random_rows(LENGTHS)
    from_lists = generate(model, rows, config, max_new_tokens=5).tokens
    for fill in (0, 255, 17):  # what stands in the padding changes nothing, bit for bit
        padded = torch.full((len(rows), 160), fill)
        for i, row in enumerate(rows):
            padded[i, :len(row)] = torch.tensor(row)
        assert torch.equal(generate(model, padded, config, max_new_tokens=5, lengths=list(LENGTHS)).tokens, from_lists)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=4), budget=st.integers(9, 40),
       method=st.sampled_from([kw for _, kw in EVERY_METHOD]), pad=st.integers(0, 255))
def test_padding_is_never_kept_or_attended(lengths, budget, method, pad):
    model = tiny_model(n_layers=2)
    config = CompressionConfig(budget=None if method["method"] in ("full", "fastgen") else budget, window=8, **method)
    rows = random_rows(lengths, seed=sum(lengths))
    tokens = torch.full((len(rows), max(lengths) + 3), pad)  # extra padding past the longest row too
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
    logits, _, positions = compress(model, tokens, config, 4, lengths)
    for layer, (cache, layer_positions) in enumerate(zip(model.caches(), positions)):
        assert cache.length.tolist() == lengths
        for i, n in enumerate(lengths):
            kept = own_positions(layer_positions[i] if config.per_kv_head else layer_positions[i, 0])
            assert all(0 <= p < n for head in kept for p in head)  # never a padding position
            assert all(len(set(head)) == len(head) for head in kept)
            if method["method"] not in ("full", "fastgen"):
                # each row's own budget (pyramidkv's differs by layer around it)
                assert all(len(head) == config.layer_budgets(n, len(model.layers))[layer] for head in kept)
            # the valid slots are exactly the row's kept entries, so nothing else is attended
            valid = (cache.pos[i] >= 0).sum(-1).tolist()
            assert valid == ([len(head) for head in kept] if len(kept) > 1 else [len(kept[0])] * len(valid))
            if len(set(lengths)) > 1:  # ragged: each row's own slots, as alone
                assert int(cache.used[i]) == max(len(head) for head in kept)
    other = tokens.clone()
    for i, n in enumerate(lengths):
        other[i, n:] = (pad + 1) % 256
    again, _, _ = compress(model, other, config, 4, lengths)
    assert torch.equal(logits, again)


def test_one_compiled_decode_serves_every_length_mix():
    model = tiny_model()
    config = CompressionConfig(keep=0.3, window=8)
    compiled = torch.compile(model.decode, fullgraph=True)
    mixes = [(150, 97, 64), (64, 120, 150), (41, 41, 150), (100, 100, 100)]
    eager = [generate(model, random_rows(mix, seed=i), config, max_new_tokens=4, n_slots=64).tokens
             for i, mix in enumerate(mixes)]
    generate(model, random_rows(mixes[0], seed=0), config, max_new_tokens=4, n_slots=64, decode=compiled)  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        for i, mix in enumerate(mixes):
            tokens = generate(model, random_rows(mix, seed=i), config, max_new_tokens=4, n_slots=64,
                              decode=compiled).tokens
            assert torch.equal(tokens, eager[i]), mix


def test_ragged_errors_name_the_prompt_and_the_fix():
    model = tiny_model()
    with pytest.raises(CompressionError, match="prompt 2: keep 0.3 of a 20-token prompt"):
        generate(model, random_rows((150, 20)), CompressionConfig(keep=0.3, window=8), max_new_tokens=2)
    with pytest.raises(PromptError, match="a prompt is empty"):
        generate(model, [[1, 2, 3], []], CompressionConfig(method="full"), max_new_tokens=2)
    with pytest.raises(PromptError, match="give one length per row"):
        generate(model, torch.zeros(2, 10, dtype=torch.long), lengths=[10, 11], max_new_tokens=2)
    with pytest.raises(PromptError, match="prompt 1: a prompt of 1000 tokens"):
        generate(model, random_rows((1000, 20)), CompressionConfig(method="full"), max_new_tokens=100)


def test_cli_runs_several_prompt_files_as_one_batch(tiny_dir, tmp_path):
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("a" * 60)
    long.write_text("b" * 130)
    result = cli("--checkpoint", str(tiny_dir), "--prompt-file", str(short), "--prompt-file", str(long),
                 "--window", "8", "--keep", "0.3", "--max-new-tokens", "4", "--no-chat")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 prompts (60, 130 tokens) as one batch" in out
    assert f"--- answer 1 ({short}) ---" in out and f"--- answer 2 ({long}) ---" in out
    assert "prompt 1          60 tokens, KV kept per layer 18 (30.0 %)" in out
    assert "prompt 2          130 tokens, KV kept per layer 39 (30.0 %)" in out


def test_cli_batch_errors(tmp_path):
    good, empty, bad = tmp_path / "good.txt", tmp_path / "empty.txt", tmp_path / "bad.jsonl"
    good.write_text("hello")
    empty.write_text("  \n")
    bad.write_text('"first prompt"\n{"prompt": "second"\nnot json\n')
    assert_user_error(cli("--prompt-file", str(good), "--prompt-file", str(empty)), "is empty")
    assert_user_error(cli("--prompts-jsonl", str(bad)), "line 2 is not JSON")
    bad.write_text('{"text": "no prompt key"}\n')
    assert_user_error(cli("--prompts-jsonl", str(bad)), "line 1 has no prompt")
    bad.write_text("\n\n")
    assert_user_error(cli("--prompts-jsonl", str(bad)), "holds no prompts")
    assert_user_error(cli("--prompts-jsonl", str(bad), "--prompt", "x"), "not allowed with")
