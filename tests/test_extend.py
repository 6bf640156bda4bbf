"""Tests for extending a compressed cache: model.extend, snapshot/restore, the query-agnostic
API and CLI (compress a context once, ask many questions). Tiny random models, plus the real
default model end to end (marked `model`)."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkkv
import devices
from chunkkv import CompressionConfig
from cli import PASSKEY_QUESTION
from conftest import (EVERY_METHOD, assert_user_error, cli, greedy, kept_positions, prefill, reference_logits,
                      tiny_model)
from generate import PromptError, answer, compile_decode, compress_context, decode_tokens, generate, prefill_and_compress

torch.set_grad_enabled(False)

PASSKEY_AGNOSTIC_KEEP = "0.3"  # measured: results/passkey.json (docs/results.md, "Compress once, ask many")


# ---------------------------------------------------------------------------------------
# the attention of many new tokens: two flash calls when they see all the cache, one masked SDPA else

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(0, 20), st.integers(1, 12),
       st.integers(0, 5), st.integers(-1, 1), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_many_new_tokens_attend_as_one_masked_softmax(n_batch, n_kv_heads, group, n_old, n_new, n_free, holed, past,
                                                      dtype):
    """devices.shared_mask_attention equals a float64 masked softmax, with each new token's log-sum-exp over
    the new tokens' keys when it splits (every row sees every entry before its new tokens, none is holed,
    and none sees a slot past them), and None when it does not."""
    q = torch.randn(n_batch, n_kv_heads * group, n_new, 8, dtype=dtype)
    k, v = (torch.randn(n_batch, n_kv_heads, n_old + n_new + n_free, 8, dtype=dtype) for _ in range(2))
    mask = torch.ones(n_new, k.shape[2], dtype=torch.bool).tril(n_old).expand(n_batch, -1, -1).clone()
    holed = holed if holed < n_batch and n_old > 1 else -1  # that row's first cache slots never attended
    if holed >= 0:
        mask[holed, :, :n_old // 2] = False
    past = past and n_free > 0
    mask[:, -1, -1] |= past  # the last new token also sees the last free slot (the rows stay nested)
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) / 8 ** 0.5
    logits = logits.masked_fill(~mask[:, None], -torch.inf)
    expected = logits.softmax(-1) @ v.double().repeat_interleave(group, 1)
    y, lse = devices.shared_mask_attention(q, k, v, mask, torch.full((n_batch,), n_old + n_new))
    tolerance = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(y.float(), expected.float(), **tolerance)
    if holed >= 0 or past or n_old == 0:
        assert lse is None
    else:
        torch.testing.assert_close(lse, logits[..., n_old:n_old + n_new].logsumexp(-1).float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# extend = prefill of the concatenation when nothing is dropped

@pytest.mark.parametrize("label, kwargs", EVERY_METHOD)
@pytest.mark.parametrize("pieces", [(14,), (1, 5, 8)])
def test_extend_without_dropping_equals_prefill_of_the_whole(label, kwargs, pieces):
    """prefill(A) then extend(B) (one piece or several) gives prefill(A + B)'s logits and the
    same greedy tokens over 16 steps, for every method, when the budget covers A."""
    model = tiny_model(n_layers=3)
    context, question = torch.randint(0, 256, (2, 40)), torch.randint(3, 256, (2, sum(pieces)))
    whole = torch.cat([context, question], 1)
    budget = {} if label in ("full", "fastgen") else dict(budget=40)
    config = CompressionConfig(window=8, recovery=1.0, **kwargs, **budget)
    prefill(model, context, config, room=sum(pieces) + 16)
    logits, start = [], 0
    for n in pieces:
        logits.append(model.extend(question[:, start:start + n]))
        start += n
    logits = torch.cat(logits, 1)
    torch.testing.assert_close(logits, model(whole)[:, 40:], rtol=1e-5, atol=1e-5)
    tokens, decoded = greedy(model, logits[:, -1], 16)

    full = prefill(model, whole, CompressionConfig(method="full"), room=16)
    torch.testing.assert_close(logits[:, -1], full, rtol=1e-5, atol=1e-5)
    full_tokens, full_decoded = greedy(model, full, 16)
    assert torch.equal(tokens, full_tokens)
    torch.testing.assert_close(decoded, full_decoded, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# extend after compression = attention over exactly the kept positions

@pytest.mark.parametrize("label, kwargs", [m for m in EVERY_METHOD if m[0] != "full"])
def test_extend_after_compression_attends_to_exactly_the_kept_positions(label, kwargs):
    """Extended (and then decoded) tokens equal a masked reference attention over the kept
    context positions plus the new tokens, at their original positions: RoPE continues from
    the logical length, not from the slot."""
    model = tiny_model(n_layers=3)
    context, question, forced = (torch.randint(3, 256, (2, n)) for n in (64, 9, 4))
    budget = {} if label == "fastgen" else dict(budget=24)
    config = CompressionConfig(window=5, chunk_size=4, recovery=0.5, **kwargs, **budget)
    prefill(model, context, config, room=13)
    kept = kept_positions(model, 64, per_head=True)
    assert all((k >= 0).sum(-1).min() < 64 for k in kept)  # every layer dropped something
    extended = torch.cat([model.extend(question[:, :3]), model.extend(question[:, 3:])], 1)
    decoded = torch.stack([model.decode(forced[:, i:i + 1]) for i in range(4)], 1)
    reference = reference_logits(model, torch.cat([context, question, forced], 1), kept, 64)[:, 64:]
    torch.testing.assert_close(torch.cat([extended, decoded], 1), reference[:, :13], rtol=1e-4, atol=1e-4)
    # compression did change the outputs: a cache that kept everything would fail above
    assert (extended - model(torch.cat([context, question], 1))[:, 64:]).abs().max() > 1e-3


def test_counters_are_per_row_and_owned_by_each_layer():
    model = tiny_model(n_layers=4)
    config = CompressionConfig(method="pyramidkv", budget=30, window=4)
    prefill(model, torch.randint(0, 256, (2, 90)), config, room=12)
    model.extend(torch.randint(0, 256, (2, 7)))
    model.decode(torch.zeros(2, 1, dtype=torch.long))
    for cache, budget in zip(model.caches(), config.layer_budgets(90, 4)):
        assert cache.used.tolist() == [budget + 8] * 2  # each layer its own count of slots
        assert cache.length.tolist() == [98, 98]  # logical length: prompt + appended


# ---------------------------------------------------------------------------------------
# snapshot and restore

def replay(model, snapshot, question, n_steps=8, decode=None):
    model.restore(snapshot)
    logits = model.extend(question)
    tokens, decoded = greedy(model, logits[:, -1], n_steps, decode)
    return logits, tokens, decoded


@pytest.mark.parametrize("config", [CompressionConfig(budget=24, window=5, chunk_size=4),
                                    CompressionConfig(method="snapkv", budget=24, window=5),
                                    CompressionConfig(method="fastgen", window=5, recovery=0.5, special_ids=(0,))])
def test_question_2_after_question_1_equals_question_2_alone(config):
    model = tiny_model(n_layers=3)
    context, q1, q2 = torch.randint(0, 256, (2, 70)), torch.randint(0, 256, (2, 11)), torch.randint(0, 256, (2, 6))
    prefill(model, context, config, room=30)
    snapshot = model.snapshot()
    compressed = [(c.used.clone(), c.length.clone(), c.pos.clone()) for c in model.caches()]
    replay(model, snapshot, q1)
    model.restore(snapshot)
    for cache, state in zip(model.caches(), compressed):  # the state right after compression
        assert all(torch.equal(a, b) for a, b in zip((cache.used, cache.length, cache.pos), state))
    after = replay(model, snapshot, q2)
    prefill(model, context, config, room=30)
    snapshot = model.snapshot()
    alone = replay(model, snapshot, q2)
    for a, b in zip(after, alone):
        assert torch.equal(a, b)  # bit for bit
    model.restore(snapshot)
    model.extend(q1)
    without_restore = model.extend(q2)  # q2 appended after q1: it sees q1, so it differs
    assert (without_restore - alone[0]).abs().max() > 1e-3


def test_restore_after_a_new_compression_is_an_error():
    model = tiny_model()
    config = CompressionConfig(budget=20, window=4)
    prefill(model, torch.randint(0, 256, (1, 50)), config, room=8)
    snapshot = model.snapshot()
    prefill(model, torch.randint(0, 256, (1, 50)), config, room=8)
    with pytest.raises(ValueError, match="compress the context again"):
        model.restore(snapshot)


def test_extend_past_the_free_slots_is_an_error():
    model = tiny_model()
    prefill(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), room=5)
    free = model.free_slots()  # 5, rounded up to a multiple of 8 slots
    with pytest.raises(ValueError, match="free cache slots"):
        model.extend(torch.zeros(1, free + 1, dtype=torch.long))


def test_decoding_past_the_cache_is_refused_before_any_step():
    """decode_tokens once ran its steps into the cache's end: an IndexError on CPU, and on CUDA a
    device-side assert that ends the process's CUDA context."""
    model = tiny_model()
    logits = prefill(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), room=5)
    free = model.free_slots()
    assert decode_tokens(model, logits, free + 1)[0].shape == (1, free + 1)  # n tokens take n - 1 steps
    prefill(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), room=5)
    with pytest.raises(PromptError, match=f"{free + 2} new tokens need {free + 1} free cache slots, the caches have {free}"):
        decode_tokens(model, logits, free + 2)


def test_decoding_reads_nothing_back_per_step(monkeypatch):
    """Under CUDA graphs the host queues step after step only if it waits for nothing: `done.all()` was
    read every step, the step timer synchronized every step, and the streamer read each token before the
    next step was queued. Now: stops read every STOP_CHECK steps, one synchronize at the end, tokens
    handed to on_token after the next step is queued."""
    import devices
    import generate as generate_module

    model = tiny_model()
    logits = prefill(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), room=40)
    events, bool_of = [], torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: events.append("read") or bool_of(t))
    monkeypatch.setattr(devices, "synchronize", lambda device: events.append("sync"))
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda token: events.append("step") or decode(token))
    assert decode_tokens(model, logits, 8)[0].shape == (1, 8)
    assert events == ["step"] * 7 + ["sync"]  # without stop tokens: nothing read, one synchronize
    events.clear()
    assert decode_tokens(model, logits, 26, stop_tokens=(256,))[0].shape == (1, 26)  # 256: never sampled
    assert events.count("read") == 25 // generate_module.STOP_CHECK and events.count("sync") == 1
    events.clear()
    decode_tokens(model, logits, 4, on_token=lambda token: events.append(("token", token.device.type)))
    assert events == ["step", ("token", "cpu"), "step", ("token", "cpu"), "step", ("token", "cpu"), ("token", "cpu"),
                      "sync"]  # each token after the step that reads it is queued


def test_the_step_timer_reads_cuda_events_once_after_the_loop(monkeypatch):
    """On CUDA each step is timed by two events, read (in milliseconds) only when the seconds are asked for."""
    import devices

    log = []

    class Event:  # torch.cuda.Event's interface, on a clock of one second per logged call
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            log.append("record")
            self.at = len(log)

        def elapsed_time(self, end):
            return 1000.0 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(devices, "synchronize", lambda device: log.append("sync"))
    timer = devices.StepTimer(torch.device("cuda"))
    for work in (1, 2, 3):
        with timer.step():
            log.extend(["work"] * work)
    assert set(log) == {"record", "work"}  # nothing waited for while stepping
    assert timer.seconds(2) == ([2.0, 3.0], []) and log[12:] == ["sync"]  # steps 1, 2 of 3


def test_stopping_a_few_steps_late_gives_the_ids_and_caches_of_stopping_at_once(monkeypatch):
    """The steps decoded past the point where every row stopped are taken back: ids, counters, positions
    and the next logits equal those of checking every step, whatever step each row stops at."""
    import generate as generate_module

    model, config = tiny_model(), CompressionConfig(budget=20, window=4)
    prompt = torch.randint(0, 256, (2, 50))
    logits = prefill(model, prompt, config, room=40)
    snapshot = model.snapshot()
    free = decode_tokens(model, logits, 30)[0]
    for first, second in [(2, 11), (9, 3), (7, 7), (0, 29), (15, 16)]:
        stops = (int(free[0, first]), int(free[1, second]))
        ends = [next(j for j, t in enumerate(row) if t in stops) for row in free.tolist()]
        seen = {}
        for check in (1, generate_module.STOP_CHECK):
            monkeypatch.setattr(generate_module, "STOP_CHECK", check)
            model.restore(snapshot)
            shown = []
            tokens = decode_tokens(model, logits, 30, stop_tokens=stops, on_token=shown.append)[0]
            state = [t.clone() for cache in model.caches() for t in (cache.used, cache.length, cache.pos)]
            seen[check] = tokens, state, model.extend(torch.tensor([[5], [6]]))[:, -1], torch.cat(shown, dim=1)
        (tokens, state, after, shown), (late, late_state, late_after, late_shown) = seen.values()
        assert tokens.shape[1] == max(ends) + 1 and torch.equal(tokens, late)
        assert all(torch.equal(a, b) for a, b in zip(state, late_state))
        assert torch.equal(after, late_after)
        assert torch.equal(late_shown[:, :tokens.shape[1]], tokens)  # then at most STOP_CHECK - 1 stop tokens more
        assert late_shown.shape[1] - tokens.shape[1] < generate_module.STOP_CHECK


def test_no_public_call_records_autograd():
    """On a GPU, an 8B prefill recorded for autograd keeps every layer's activations."""
    model = tiny_model()
    prompt, question = torch.randint(0, 256, (1, 60)), torch.randint(0, 256, (1, 4))
    config = CompressionConfig(budget=40, window=4)
    with torch.enable_grad():  # as in a user's process (this file turns it off at import)
        outputs = [generate(model, prompt, config, max_new_tokens=3).tokens,
                   prefill_and_compress(model, prompt, [60], config, 8)[0], model.decode(prompt[:, :1]),
                   model.extend(prompt[:, :2]), model.capture(prompt)[0]]  # model(tokens), the plain forward, may train
        outputs.append(answer(model, compress_context(model, prompt, config, 16), question, 3).tokens)
        outputs += [generate(model, prompt, config, 40, cache_budget=48).tokens]
    tensors = outputs + [t for layer in model.cache_tensors() for t in layer if t is not None]
    assert [i for i, t in enumerate(tensors) if t.requires_grad or t.grad_fn is not None] == []


def test_every_timed_interval_starts_and_ends_after_the_device_is_synchronized(monkeypatch):
    """CUDA queues work: a clock read before a synchronize bills the queued prefill (or decode steps)
    to compression (or re-compression). Seen on CPU by the order of the calls."""
    import time

    import generate as generate_module
    import model as model_module

    events, clock = [], time.perf_counter
    monkeypatch.setattr(model_module, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(generate_module, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(time, "perf_counter", lambda: events.append("clock") or clock())
    for module, name in [(chunkkv, "keep_positions"), (model_module.KVCache, "recompress")]:
        work = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, work=work, name=name, **kw: events.append(name) or work(*a, **kw))
    record = generate(tiny_model(), torch.randint(0, 256, (1, 60)), CompressionConfig(budget=40, window=4),
                      max_new_tokens=30, cache_budget=48)
    assert record.recompressions > 0 and {"keep_positions", "recompress"} <= set(events)
    for i, event in enumerate(events):
        if event in ("keep_positions", "recompress"):  # the clocks either side of the work timed
            start = max(j for j in range(i) if events[j] == "clock")
            stop = min(j for j in range(i, len(events)) if events[j] == "clock")
            assert events[start - 1] == events[stop - 1] == "sync", (event, events[start - 2:stop + 1])


def test_batch_rows_are_independent():
    model = tiny_model(n_layers=3)
    contexts, questions = torch.randint(0, 256, (2, 80)), torch.randint(0, 256, (2, 7))
    config = CompressionConfig(budget=30, window=6, chunk_size=5)
    prefill(model, contexts, config, room=16)
    batch = replay(model, model.snapshot(), questions)
    batch_kept = kept_positions(model, 80)
    assert not torch.equal(batch_kept[0][0], batch_kept[0][1])
    for row in range(2):
        prefill(model, contexts[row:row + 1], config, room=16)
        single = replay(model, model.snapshot(), questions[row:row + 1])
        torch.testing.assert_close(batch[0][row:row + 1], single[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(batch[1][row:row + 1], single[1])
        assert all(torch.equal(a[row], b[0]) for a, b in zip(batch_kept, kept_positions(model, 80)))


# ---------------------------------------------------------------------------------------
# compiled decode after extend: one graph, no recompiles

def test_compiled_decode_after_extend_does_not_recompile():
    torch._dynamo.reset()
    model = tiny_model()
    compiled = compile_decode(model)
    config = CompressionConfig(budget=20, window=4)

    def run(context, questions, decode):
        prefill(model, context, config, room=40)
        snapshot = model.snapshot()
        return [replay(model, snapshot, q, n_steps=10, decode=decode) for q in questions]

    context = torch.randint(0, 256, (2, 60))
    run(context, [torch.randint(0, 256, (2, 3))], compiled)  # compiles once
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompile is an error from here on
        for n_context in (60, 75):
            context = torch.randint(0, 256, (2, n_context))
            questions = [torch.randint(0, 256, (2, n)) for n in (1, 9, 17)]
            eager = run(context, questions, model.decode)
            for (_, tokens, logits), (_, eager_tokens, eager_logits) in zip(run(context, questions, compiled), eager):
                assert torch.equal(tokens, eager_tokens)
                torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The query-agnostic API and CLI

def test_answer_from_an_uncompressed_context_equals_generate_on_the_whole_prompt():
    model = tiny_model(n_layers=3)
    full = CompressionConfig(method="full")
    context, questions = torch.randint(0, 256, (2, 50)), [torch.randint(0, 256, (2, n)) for n in (9, 4)]
    questions.append(questions[0])  # the first question again, after the second
    expected = [generate(model, torch.cat([context, q], 1), full, max_new_tokens=12).tokens for q in questions]
    compressed = compress_context(model, context, full, max_new_tokens=30)  # once, for every question
    for question, tokens in zip(questions, expected):
        assert torch.equal(answer(model, compressed, question, max_new_tokens=12).tokens, tokens)
        # context + this question + the answer's tokens but the last (never fed back); nothing earlier
        assert all(c.length.tolist() == [50 + question.shape[1] + 11] * 2 for c in model.caches())


def test_answer_that_does_not_fit_is_a_prompt_error():
    model = tiny_model()
    compressed = compress_context(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), 10)
    with pytest.raises(PromptError, match="does not fit in the 12 cache slots"):  # 20 + 10 -> 32 slots
        answer(model, compressed, torch.zeros(1, 5, dtype=torch.long), max_new_tokens=8)
    compress_context(model, torch.randint(0, 256, (1, 50)), CompressionConfig(budget=20, window=4), 10)
    with pytest.raises(ValueError, match="compress the context again"):
        answer(model, compressed, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2)


def test_cli_answers_several_questions_from_one_compression(tiny_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("z" * 200)
    questions = tmp_path / "questions.txt"
    questions.write_text("first question?\n\nsecond one?\nthird\n")
    common = ("--checkpoint", str(tiny_dir), "--context-file", str(context), "--window", "8", "--max-new-tokens", "5")
    for asked in (("--question", "first question?", "--question", "second one?", "--question", "third"),
                  ("--questions-file", str(questions))):
        result = cli(*common, *asked)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert out.count("Compressing") == 1 and "201 tokens" in out  # the context and its newline
        assert "KV kept per layer 20 of 201" in out
        assert "context was prefilled and compressed once, 3 questions answered from it" in out
        for i, question in enumerate(["first question?", "second one?", "third"], start=1):
            assert f"--- question {i}: {question} ---" in out
            assert f"question {i:<8} {len(question)} tokens, extend" in out  # byte tokenizer: one token a byte


def test_cli_question_errors(tiny_dir, tmp_path):
    context, empty, latin1 = tmp_path / "context.txt", tmp_path / "empty.txt", tmp_path / "latin1.txt"
    context.write_text("z" * 200)
    empty.write_text("\n  \n")
    latin1.write_bytes("café".encode("latin-1"))
    tiny = ("--checkpoint", str(tiny_dir), "--window", "8")
    assert_user_error(cli(*tiny, "--context-file", str(context)), "--context-file needs questions")
    assert_user_error(cli(*tiny, "--prompt", "hi", "--question", "q"), "use --context-file")
    assert_user_error(cli(*tiny, "--context-file", str(context), "--questions-file", str(empty)), "has no questions")
    assert_user_error(cli(*tiny, "--context-file", str(latin1), "--question", "q"), "context file", "is not UTF-8")
    assert_user_error(cli(*tiny, "--context-file", str(context), "--question", "q", "--questions-file", str(empty)),
                      "not allowed with argument")
    assert_user_error(cli(*tiny, "--context-file", str(context), "--question", " "), "a --question is empty")
    assert_user_error(cli(*tiny, "--context-file", str(context), "--question", "q", "--max-new-tokens", "60"),
                      "exceeds the model's context of 256")


# ---------------------------------------------------------------------------------------
# The real default model, end to end

@pytest.mark.model
def test_cli_answers_the_pass_key_demo_from_a_context_compressed_without_the_question():
    result = cli("--question", PASSKEY_QUESTION, "--keep", PASSKEY_AGNOSTIC_KEEP, process=True)
    assert result.returncode == 0, result.stderr
    assert "without the questions; then 1 question" in result.stdout
    assert f"({float(PASSKEY_AGNOSTIC_KEEP) * 100:.1f} %), 30 layers" in result.stdout
    assert "found in the answer to question 1" in result.stdout and "NOT found" not in result.stdout


@pytest.mark.model
@pytest.mark.parametrize("bench, args", [  # quality on the tiny checkpoint; the others on the default model
    ("quality", ["--quick", "--retrieval-only", "--lengths", "512", "--tasks", "multikey", "--keeps", "0.2"]),
    ("questions", ["--quick"]),
    ("passkey", ["--quick"]),
])
def test_bench_quick_runs(bench, args, bench_checkpoint, tmp_path):
    out = tmp_path / f"{bench}.json"
    args = args + (["--checkpoint", bench_checkpoint] if bench == "quality" else [])
    result = cli(bench, *args, "--out", str(out), script="bench.py")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert rows and all({"bench", "metric", "value", "command", "date", "machine"} <= row.keys() for row in rows)
    assert {r["setting"] for r in rows} == ({"aware", "agnostic", "saved"} if bench == "questions" else {"aware", "agnostic"})
    if bench == "quality":  # multikey: each of the four keys asked in turn, in both settings
        assert {(r["setting"], r["question"]) for r in rows} == {(s, q) for s in ("aware", "agnostic") for q in range(4)}
        assert "Retrieval accuracy by setting" in result.stdout and "n=8" in result.stdout
    elif bench == "questions":
        assert {r["k"] for r in rows} == {1, 2} and "speed-up" in result.stdout
        saved = [r for r in rows if r["setting"] == "saved"]  # answered in a fresh process from the saved file
        assert saved and all(r["file_bytes"] > 0 and 0 < r["first_token_seconds"] <= r["value"] for r in saved)
        assert "cache load + first token" in result.stdout
    else:
        assert "Pass-key demo" in result.stdout


# ---------------------------------------------------------------------------------------
# Sliding-window models: exact only within the window, on every path that extends a cache

def test_every_path_that_extends_a_cache_refuses_to_pass_the_sliding_window():
    model = tiny_model(sliding_window=64)
    context = compress_context(model, torch.randint(0, 256, (1, 40)), CompressionConfig(method="full"), 20, n_slots=128)
    with pytest.raises(PromptError, match="sliding window of 64"):  # 40 + 20 + 10 positions
        answer(model, context, torch.randint(0, 256, (1, 20)), max_new_tokens=10)
    logits, _ = prefill_and_compress(model, torch.randint(0, 256, (1, 40)), [40], CompressionConfig(method="full"), 10,
                                     n_slots=128)
    with pytest.raises(PromptError, match="sliding window of 64"):  # 88 free slots, but 70 positions
        decode_tokens(model, logits, max_new_tokens=30)


def test_interactive_stops_with_an_error_at_the_sliding_window(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 64}))
    turns = "".join(f"turn {i}\n" for i in range(12))
    result = cli("--checkpoint", str(tiny_dir), "--interactive", "--no-chat", "--cache-budget", "48", "--window", "8",
                 "--max-new-tokens", "8", stdin=turns)
    assert_user_error(result, "sliding window of 64", progress=True)
    assert 0 < result.stdout.count("[cache: ") < 12
