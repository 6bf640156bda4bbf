"""Compressed contexts: what compressing a context once leaves in the caches, the records of what a
prefill and a generation did, and a context saved to and loaded from one safetensors file, to be asked
questions in another process.

    context = compress_context(model, ids, CompressionConfig(keep=0.1))  # generate.py
    save_context("doc.kv", model, tokenizer, context)
    context = load_context("doc.kv", model, tokenizer)  # later, elsewhere: answer(model, context, question)

The file holds each layer's kept entries only (the free slots after them are allocated again on
load): k, v [B, Hkv, n, D] in the model's dtype, pos [B, Hkv, n] int32 and the counters `used`,
`length` [B]; the context's ids [B, T] int32 and, when known, its text (UTF-8 bytes). Its metadata
(JSON in the safetensors header) holds the compression settings, each layer's slot count, the
fingerprint of the model that wrote it, and a SHA-256 of everything else. Nothing is unpickled, and a
file is checked whole, against the model, before any cache is touched.
"""
import hashlib
import json
import math
import os
import stat
import tempfile
import time
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tokenizers import Tokenizer
from torch import Tensor

import chunkkv
from checkpoint import MAX_SIZE, shown
from chunkkv import CompressionConfig, CompressionError
from devices import synchronize
from model import CacheRequest, PromptError, Transformer
from registry import sigterm_as_exit
from tokenizer import CheckpointError

FORMAT = "chunkkv-context-1"
MAX_HEADER = 2 ** 23  # bytes of JSON a file's header may hold (8 MiB); chunkkv writes a few KiB
SAMPLE = 4096  # values of each weight tensor the fingerprint reads
A_CACHE_FILE = "pass a file that --save-cache or save_context wrote"  # the fix for what is none
LAYER_TENSORS = ("k", "v", "pos", "used", "length")  # of KVCache.TENSORS: a compressed context keeps no queries
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I32": torch.int32,
          "I64": torch.int64, "U8": torch.uint8}  # safetensors' names of the dtypes a file may hold


@dataclass
class Prefilled:
    """What the prefill and compression of a batch of prompts did (`measured`: asked from the caches)."""
    lengths: list[int]  # each row's prompt tokens
    budgets: list[list[int]]  # [row][layer] prompt entries the method may keep
    kept: list[list[float]]  # [row][layer] prompt entries kept (mean over KV heads), asked from the caches
    prefill_seconds: float  # the whole prefill, compression included
    compress_seconds: float  # scoring, selection and gather, all layers
    kv_bytes: int  # the caches as allocated (K, V, positions; slots for new tokens included)
    kv_bytes_full: int  # the same caches without compression

    @classmethod
    def measured(cls, model: Transformer, lengths: list[int], budgets: list[list[int]], room: int,
                 n_slots: int | None, prefill_seconds: float, compress_seconds: float) -> "Prefilled":
        kept = torch.stack([(p >= 0).sum(-1).float().mean(-1) for p in model.kept_positions(lengths)])  # [layer, B]
        full_slots = n_slots or -(-(max(lengths) + room) // 8) * 8  # per layer, without compression
        return cls(lengths, budgets, kept.T.tolist(), prefill_seconds, compress_seconds, model.cache_bytes(),
                   len(lengths) * model.args.n_layers * full_slots * model.slot_bytes())


@dataclass
class Record:
    """What `generate` or `answer` did."""
    tokens: Tensor  # new token ids [B, n]; rows that stopped early repeat their stop token
    step_seconds: list[float]  # each steady decode step: re-compressions and warm-up excluded
    warmup_seconds: list[float]  # steps that compiled the step or recorded its CUDA graph
    prefill: Prefilled | None = None  # generate: the prompts' prefill and compression
    extend_seconds: float = 0.0  # answer: appending the question to the compressed context
    recompressions: int = 0  # with a cache budget: how often the cache was compressed again
    recompress_seconds: float = 0.0


@dataclass
class CompressedContext:
    """A context compressed once, before any question: the caches' state right after, and what it cost.
    The caches live in the model: a later prefill or compression on it invalidates this."""
    n_tokens: int  # context tokens T
    free_slots: int  # cache slots left for each question and its answer
    snapshot: list  # model.snapshot() right after compression
    prefill: Prefilled
    config: CompressionConfig  # how it was compressed
    tokens: Tensor  # the context's ids [B, T]
    text: str | None = None  # the context as text, when the caller sets it: a saved file then carries it
    chat: bool = False  # whether `text` was one user turn of the checkpoint's chat template


# ---------------------------------------------------------------------------------------
# Compressing a context before any question by KVzip's repeat of it (scorer "reconstruct")

@dataclass(frozen=True)
class Repeat:
    """KVzip's teacher-forced repeat of a context (Kim et al., NeurIPS 2025), as token ids in the
    checkpoint's format: context block i (`block` tokens from `start` on) is repeated after `first`
    (i = 0) or after `later` + the previous block's last 8 tokens, then `suffix` (the template's turn
    to the assistant; "\n" without a template). Their text: tokenizer.REPEAT_FIRST and REPEAT_LATER."""
    first: list[int]
    later: list[int]
    suffix: list[int]
    start: int = 0  # context tokens before the text (a chat template's header): never repeated, scored 0
    block: int = 2048  # context tokens per repeat: KVzip's m

    def prompts(self, ids: list[int]) -> list[tuple[int, int, list[int]]]:
        """(start, end, the repeat's ids) of each block of the context `ids`."""
        spans = [(i, min(i + self.block, len(ids))) for i in range(self.start, len(ids), self.block)]
        return [(i, j, (self.first if i == self.start else self.later + ids[i - 8:i]) + self.suffix + ids[i:j])
                for i, j in spans]


@torch.no_grad()
def reconstruction_scores(model: Transformer, tokens: Tensor, repeat: Repeat, n_sinks: int) -> list[Tensor]:
    """Each layer's KVzip scores of the context tokens [B, T] (rows of one length), [B, Hkv, T] float32,
    from caches that hold the whole context (a full prefill) and room for a repeat: each block's
    repeat is teacher-forced on top of them, scored (chunkkv.reconstruction_scores) and rolled back,
    so the caches end as they began. The first n_sinks tokens score +inf, the rest before
    repeat.start 0."""
    (n_batch, n_context), args = tokens.shape, model.args
    rows = [repeat.prompts(ids) for ids in tokens.tolist()]
    scores = [torch.zeros(n_batch, args.n_kv_heads, n_context, device=tokens.device) for _ in model.caches()]
    prefilled, none = model.snapshot(), model.embed_tokens.weight.new_zeros(n_batch, args.n_heads, 0, args.head_dim)
    for i, (start, end, ids) in enumerate(rows[0]):
        for cache in model.caches():
            cache.keep_queries(none, len(ids))  # remember exactly the repeat's queries
        model.extend(torch.tensor([row[i][2] for row in rows], device=tokens.device), logits=False)  # the caches only
        for layer, cache in enumerate(model.caches()):
            scores[layer][..., start:end] = chunkkv.reconstruction_scores(cache.queries, cache.k, start, end, n_context,
                                                                          n_sinks, own_lse=cache.own_lse)
            cache.keep_queries(None, 0)
        model.restore(prefilled)
    for layer_scores in scores:
        layer_scores[..., :n_sinks] = math.inf
    return scores


@torch.no_grad()
def reconstruct_and_compress(model: Transformer, tokens: Tensor, config: CompressionConfig, repeat: Repeat | None,
                             room: int, n_slots: int | None = None) -> Prefilled:
    """Prefill the context tokens [B, T] (rows of one length) into full caches, score it by its repeat
    (reconstruction_scores), compress every layer's cache from the scores as `config`'s selector says
    (a per-layer one sums them over the KV heads), `room` slots left free: the record (compress_seconds:
    repeats, scoring, selection). CompressionError without a repeat; PromptError past the context."""
    if repeat is None:
        raise CompressionError("scorer 'reconstruct' repeats the context: pass repeat=contexts.Repeat(...)")
    n_batch, n_context = tokens.shape
    n_repeat = max(len(ids) for _, _, ids in repeat.prompts(tokens[0].tolist()))
    model.check_room(n_context + max(room, n_repeat), f"a context of {n_context} tokens + its repeat of {n_repeat} "
                     f"(scorer reconstruct) or {room} new tokens", "shorten the context or the repeat's block")
    budgets = [config.layer_budgets(n_context, model.args.n_layers)] * n_batch
    start = time.perf_counter()
    model.prefill(tokens, CacheRequest(CompressionConfig(method="full"), [n_context] * n_batch,
                                       [[n_context] * model.args.n_layers] * n_batch, max(room, n_repeat)))
    synchronize(tokens.device)
    scored = time.perf_counter()
    scores = reconstruction_scores(model, tokens, repeat, config.n_sinks)
    full = [(None, cache.k[:, :, :n_context], cache.v[:, :, :n_context]) for cache in model.caches()]
    model.compress(full, CacheRequest(config, [n_context] * n_batch, budgets, room, n_slots, tokens, scores))
    synchronize(tokens.device)
    end = time.perf_counter()
    return Prefilled.measured(model, [n_context] * n_batch, budgets, room, n_slots, end - start, end - scored)


def kept_kv(model: Transformer) -> list[dict[str, Tensor]]:
    """Each layer's kept entries and counters (LAYER_TENSORS): slots [0, n) of the fullest row."""
    layers = []
    for cache in model.caches():
        n = int(cache.used.max())
        layers.append({"k": cache.k[:, :, :n], "v": cache.v[:, :, :n], "pos": cache.pos[:, :, :n],
                       "used": cache.used, "length": cache.length})
    return layers


# ---------------------------------------------------------------------------------------
# Saving

def save_context(path: str | Path, model: Transformer, tokenizer: Tokenizer, context: CompressedContext) -> int:
    """Write `context` (compress_context's, on this model) to `path` as one safetensors file; its size
    in bytes. Atomic: written to a temporary file in the same folder, synced and renamed into place;
    on an error, Ctrl-C or SIGTERM no file and no temporary file is left. Raises PromptError when the
    caches were refilled since the compression, or the file cannot be written."""
    try:
        model.restore(context.snapshot)  # the caches as compression left them
    except ValueError as e:
        raise PromptError(str(e)) from None
    tensors = {"tokens": context.tokens.to("cpu", torch.int32)}
    if context.text is not None:
        tensors["text"] = torch.from_numpy(np.frombuffer(context.text.encode(), dtype=np.uint8).copy())
    layers = kept_kv(model)
    for i, layer in enumerate(layers):
        tensors.update({f"layers.{i}.{name}": t.cpu().contiguous() for name, t in layer.items()})
    fields_json = json.dumps({
        "format": FORMAT, "fingerprint": fingerprint(model, tokenizer), "config": asdict(context.config),
        "rows": context.tokens.shape[0], "n_tokens": context.n_tokens, "chat": context.chat,
        "text_bytes": None if context.text is None else tensors["text"].numel(),
        "kept": [layer["k"].shape[2] for layer in layers], "slots": [cache.k.shape[2] for cache in model.caches()],
        "prefill_seconds": context.prefill.prefill_seconds, "compress_seconds": context.prefill.compress_seconds,
        "kv_bytes_full": context.prefill.kv_bytes_full})
    data = save(tensors, {"chunkkv": fields_json, "sha256": digest(fields_json, tensors)})
    write_atomically(Path(path), data)
    return len(data)


def check_writable(path: str | Path):
    """PromptError unless a file can be created at `path` (--save-cache checks before compressing)."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        problem = "it is a folder" if path.is_dir() else f"the folder {path.parent} does not exist or is not writable"
        raise PromptError(f"cannot write cache file {path}: {problem}; pass a path in a writable folder")


def write_atomically(path: Path, data: bytes):
    """`data` at `path`, whole or not at all."""
    with sigterm_as_exit():  # SIGTERM raises SystemExit, so `finally` removes the temporary file
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the bytes on disk before the name: a crash leaves the old file or the new
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary name only
            os.replace(tmp, path)
        except OSError as e:
            raise PromptError(f"cannot write cache file {path} ({e.strerror}): pass a path in a writable folder "
                              "with room for it") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def fingerprint(model: Transformer, tokenizer: Tokenizer) -> dict[str, str]:
    """What a cache file must share with the model that loads it: the dtype of its K/V, and SHA-256s of
    the architecture (every ModelArgs field: shapes, RoPE, context), of the tokenizer as `tokenizers`
    serializes it (tokenizer.json's vocabulary, merges, normalizer, pre-tokenizer, added tokens) and of
    the weights: every tensor's name, shape and SAMPLE values strided through it. Any other checkpoint,
    a fine-tune of the same one included, differs in that sample; a single edited weight may not, but
    hashing all of them would cost more than the load (~0.5 GB for the default model)."""
    weights = hashlib.sha256()
    for name, w in sorted(model.state_dict().items()):
        flat = w.detach().reshape(-1)
        weights.update(f"{name} {tuple(w.shape)};".encode())
        weights.update(tensor_bytes(flat[::max(1, flat.numel() // SAMPLE)]))
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {"dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
            "architecture": sha(json.dumps(asdict(model.args), sort_keys=True)),
            "tokenizer": sha(tokenizer.to_str()), "weights": weights.hexdigest()}


def tensor_bytes(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def digest(fields_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the metadata as stored and of every tensor's name, dtype, shape and bytes, in name
    order: independent of where safetensors puts each tensor in the file."""
    sha = hashlib.sha256(fields_json.encode())
    for name in sorted(tensors):
        sha.update(f"{name} {tensors[name].dtype} {tuple(tensors[name].shape)};".encode())
        sha.update(tensor_bytes(tensors[name]))
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------
# Loading: the whole file checked, against the model, before any cache is touched

FIELDS = {"format": "str", "fingerprint": "dict", "config": "dict", "rows": "size", "n_tokens": "size",
          "chat": "bool", "text_bytes": "count or null", "kept": "sizes", "slots": "sizes",
          "prefill_seconds": "seconds", "compress_seconds": "seconds", "kv_bytes_full": "count"}


def load_context(path: str | Path, model: Transformer, tokenizer: Tokenizer) -> CompressedContext:
    """The context saved at `path`, put back into the model's caches as compression left them (the free
    slots allocated again): `answer` then gives, bit for bit, what it gave in the process that saved
    it. Refused in one line, with nothing used: PromptError for a missing, truncated, edited or foreign
    file and for sizes the model cannot hold; CheckpointError for a file saved from another checkpoint,
    dtype or tokenizer."""
    path = Path(path)
    header, payload = read_header(path)
    fields_json, meta = metadata(path, header)
    check_fingerprint(path, meta["fingerprint"], fingerprint(model, tokenizer))
    config = settings(path, meta["config"], model.args.vocab_size)
    try:
        budgets = config.layer_budgets(meta["n_tokens"], model.args.n_layers)
    except CompressionError as e:
        raise refused(path, f"holds settings that cannot compress its context ({e})") from None
    expected = layout(path, meta, model)
    check_table(path, header, expected, payload)
    tensors = read_tensors(path, expected)
    if digest(fields_json, tensors) != header["__metadata__"]["sha256"]:
        raise refused(path, "fails its checksum: it was edited or damaged after it was saved")
    text = check_values(path, tensors, meta, model.args.vocab_size)
    return restored(model, tensors, meta, config, budgets, text)


def refused(path: Path, problem: str, fix: str = "save it again (--save-cache, save_context)") -> PromptError:
    return PromptError(f"cache file {path} {problem}: {fix}")


def parse_json(path: Path, data: bytes | str):
    """JSON from a file no one vouches for: anything that does not parse is a one-line error."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # also bytes that are not UTF-8, 5,000-digit numbers, deep nesting
        raise refused(path, "is not a chunkkv cache (its header is not JSON)", A_CACHE_FILE) from None


def read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header, the bytes after it), reading at most 8 + MAX_HEADER bytes."""
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # non-blocking: a FIFO must not hang
            mode, size = os.fstat(f.fileno())[stat.ST_MODE], os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if stat.S_ISREG(mode) else 0
            data = f.read(n) if 2 <= n <= MAX_HEADER else b""
    except FileNotFoundError:
        raise PromptError(f"cache file {path} does not exist: pass the file --save-cache wrote") from None
    except OSError as e:
        raise PromptError(f"cannot read cache file {path} ({e.strerror}): check the path") from None
    if not stat.S_ISREG(mode):
        raise refused(path, "is not a file", A_CACHE_FILE)
    if size < 8 or not 2 <= n <= MAX_HEADER:
        raise refused(path, "is not a chunkkv cache (no safetensors header)", A_CACHE_FILE)
    if len(data) < n:
        raise refused(path, f"is truncated ({size} bytes, its header alone {n + 8})")
    header = parse_json(path, data)
    if type(header) is not dict:
        raise refused(path, "is not a chunkkv cache (its header is no JSON object)", A_CACHE_FILE)
    return header, size - 8 - n


def is_kind(value, kind: str) -> bool:
    """Whether a JSON value is of a FIELDS kind (bools are no numbers)."""
    whole = type(value) is int
    return {"size": whole and 1 <= value <= MAX_SIZE, "count": whole and value >= 0,
            "count or null": value is None or whole and value >= 0, "str": type(value) is str,
            "seconds": type(value) in (int, float) and math.isfinite(value) and value >= 0,
            "bool": type(value) is bool, "dict": type(value) is dict,
            "sizes": type(value) is list and all(is_kind(x, "size") for x in value)}[kind]


def metadata(path: Path, header: dict) -> tuple[str, dict]:
    """(the metadata as stored, parsed), every field of FIELDS present and of its kind."""
    stored = header.get("__metadata__")
    if type(stored) is not dict or not all(type(stored.get(key)) is str for key in ("chunkkv", "sha256")):
        raise refused(path, "is not a chunkkv cache (a safetensors file without chunkkv's metadata)",
                      A_CACHE_FILE)
    meta = parse_json(path, stored["chunkkv"])
    if type(meta) is not dict or meta.get("format") != FORMAT:
        raise refused(path, f"is not in the format this chunkkv reads ({FORMAT}, it says "
                      f"{shown(meta.get('format') if type(meta) is dict else meta)})", "compress the context again")
    for key, kind in FIELDS.items():
        if not is_kind(meta.get(key), kind):
            raise refused(path, f"holds {key} {shown(meta.get(key))} where chunkkv writes {kind}")
    if set(meta) != set(FIELDS):
        raise refused(path, f"holds metadata chunkkv does not write ({', '.join(sorted(set(meta) - set(FIELDS)))})")
    return stored["chunkkv"], meta


def check_fingerprint(path: Path, saved: dict, own: dict[str, str]):
    """CheckpointError unless the file was saved from this checkpoint, in this dtype, with this tokenizer."""
    if set(saved) != set(own) or not all(type(value) is str for value in saved.values()):
        raise refused(path, "holds a fingerprint chunkkv does not write")
    if saved["dtype"] != own["dtype"]:
        raise CheckpointError(f"cache file {path} holds {shown(saved['dtype'])} K/V, the model runs in "
                              f"{own['dtype']}: load the model in the dtype the file was saved in (--dtype), or "
                              "compress the context again")
    for key, differs in (("architecture", "its architecture differs"), ("tokenizer", "its tokenizer differs"),
                         ("weights", "its weights differ: other values or other --weights")):
        if saved[key] != own[key]:
            raise CheckpointError(f"cache file {path} was saved from another checkpoint ({differs}): load "
                                  "the checkpoint that saved it (--checkpoint), or compress the context again")


def settings(path: Path, saved: dict, vocab_size: int) -> CompressionConfig:
    """The compression settings a file holds, each field of the type CompressionConfig declares, then
    checked by CompressionConfig itself; token ids within the vocabulary."""
    declared = {f.name: f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
                for f in fields(CompressionConfig)}

    def fits(value, kind) -> bool:
        if kind in (int, bool, str):
            return type(value) is kind and (kind is not int or abs(value) <= MAX_SIZE)
        if kind is float:
            return type(value) in (int, float) and math.isfinite(value)
        if kind is type(None):
            return value is None
        return type(value) is list and all(type(i) is int and 0 <= i < vocab_size for i in value)  # token ids
    if not set(saved) <= set(declared):  # a setting added since (scorer) takes its default
        raise refused(path, "holds compression settings chunkkv does not write")
    for name, value in saved.items():
        if not any(fits(value, kind) for kind in declared[name]):
            kinds = " or ".join(kind.__name__ for kind in declared[name])
            raise refused(path, f"holds the setting {name} {shown(value)}, not {kinds}")
    try:
        return CompressionConfig(**{name: tuple(v) if type(v) is list else v for name, v in saved.items()})
    except CompressionError as e:
        raise refused(path, f"holds compression settings chunkkv refuses ({e})") from None


def layout(path: Path, meta: dict, model: Transformer) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Each tensor's dtype and shape as the metadata says, within what the model can hold: a context
    within its context length, each layer's kept entries within the context, and the free slots
    allocated again (not in the file) within one context length per layer over all rows."""
    args, rows, n_tokens, kept, slots = model.args, meta["rows"], meta["n_tokens"], meta["kept"], meta["slots"]
    if n_tokens > args.max_seq_len:
        raise refused(path, f"holds a context of {n_tokens} tokens, more than the model's {args.max_seq_len}")
    if len(kept) != args.n_layers or len(slots) != args.n_layers:
        raise refused(path, f"holds {len(kept)} layers, the model has {args.n_layers}")
    for n, n_slots in zip(kept, slots):
        if n > n_tokens or n > n_slots or rows * (n_slots - n) > args.max_seq_len + 7:
            raise refused(path, f"asks for {n_slots} cache slots a row beside {n} kept entries of a {n_tokens}-token "
                          f"context, in {rows} rows: more than the model's context of {args.max_seq_len} can use")
    shape, dtype = (rows, args.n_kv_heads), model.embed_tokens.weight.dtype
    expected = {"tokens": (torch.int32, (rows, n_tokens))}
    if meta["text_bytes"] is not None:
        expected["text"] = (torch.uint8, (meta["text_bytes"],))
    for i, n in enumerate(kept):
        kv = (dtype, (*shape, n, args.head_dim))
        expected.update({f"layers.{i}.k": kv, f"layers.{i}.v": kv, f"layers.{i}.pos": (torch.int32, (*shape, n)),
                         f"layers.{i}.used": (torch.int64, (rows,)), f"layers.{i}.length": (torch.int64, (rows,))})
    return expected


def check_table(path: Path, header: dict, expected: dict, payload: int):
    """The header lists exactly the `expected` tensors, and the file holds their bytes, no more and no fewer."""
    table = {name: entry for name, entry in header.items() if name != "__metadata__"}
    names = {dtype: name for name, dtype in DTYPES.items()}
    for name, (dtype, shape) in expected.items():
        entry = table.get(name)
        if type(entry) is not dict or entry.get("dtype") != names[dtype] or entry.get("shape") != list(shape):
            raise refused(path, f"holds {name} as {shown(entry)}, where its metadata says {names[dtype]} {list(shape)}")
    if set(table) != set(expected):
        raise refused(path, f"holds tensors its metadata does not list ({shown(sorted(set(table) - set(expected)))})")
    n_bytes = sum(math.prod(shape) * dtype.itemsize for dtype, shape in expected.values())
    if payload != n_bytes:
        raise refused(path, f"is truncated ({payload} bytes of tensors, its header lists {n_bytes})"
                      if payload < n_bytes else f"holds {payload - n_bytes} bytes more than its header lists")



def read_tensors(path: Path, expected: dict) -> dict[str, Tensor]:
    """The `expected` tensors, copied out of the file (no view of a file that may change meanwhile)."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name).clone() for name in expected}
    except Exception as e:  # safetensors' own errors (offsets, sizes) and OSError: the file's
        raise refused(path, f"cannot be read ({shown(str(e))})") from None
    for name, (dtype, shape) in expected.items():
        if (tensors[name].dtype, tuple(tensors[name].shape)) != (dtype, shape):
            raise refused(path, "changed while it was read", "load it again")
    return tensors


def check_values(path: Path, tensors: dict[str, Tensor], meta: dict, vocab_size: int) -> str | None:
    """What the caches index and attend with, in range: ids within the vocabulary, each row's `used`
    within its layer's kept slots, `length` the context's, each position -1 or within the context and
    -1 past a row's used slots. The text (None if not stored), which must be UTF-8."""
    tokens, n_tokens = tensors["tokens"], meta["n_tokens"]
    if bool((tokens < 0).any() | (tokens >= vocab_size).any()):
        raise refused(path, f"holds token ids outside the model's vocabulary of {vocab_size}")
    for i, n in enumerate(meta["kept"]):
        used, length, pos = (tensors[f"layers.{i}.{name}"] for name in ("used", "length", "pos"))
        unused = torch.arange(n)[None, None, :] >= used[:, None, None]  # [B, 1, n]
        if not (bool((used >= 1).all()) and int(used.max()) == n and bool((length == n_tokens).all())
                and bool(((pos >= -1) & (pos < n_tokens)).all()) and not bool((unused & (pos != -1)).any())):
            raise refused(path, f"holds counters or positions of layer {i} that no compression leaves")
    if "text" not in tensors:
        return None
    try:
        return tensors["text"].numpy().tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise refused(path, f"holds a context text that is not UTF-8 (byte {e.start})") from None


def restored(model: Transformer, tensors: dict[str, Tensor], meta: dict, config: CompressionConfig,
             budgets: list[int], text: str | None) -> CompressedContext:
    """Fill every layer's cache from a checked file; the context as compress_context returned it."""
    device, rows, n_tokens = model.embed_tokens.weight.device, meta["rows"], meta["n_tokens"]
    for i, (cache, n_slots) in enumerate(zip(model.caches(), meta["slots"])):
        k, v, pos, used, length = (tensors[f"layers.{i}.{name}"].to(device) for name in LAYER_TENSORS)
        cache.fill(k, v, pos, n_slots, length, used)
        cache.keep_queries(None, config.window)
    lengths = [n_tokens] * rows
    kept = torch.stack([(p >= 0).sum(-1).float().mean(-1) for p in model.kept_positions(lengths)])  # [layer, B]
    prefill = Prefilled(lengths, [budgets] * rows, kept.T.tolist(), meta["prefill_seconds"], meta["compress_seconds"],
                        model.cache_bytes(), meta["kv_bytes_full"])
    free = min(model.free_slots(), model.args.max_seq_len - n_tokens)
    tokens = tensors["tokens"].to(device, torch.long)
    return CompressedContext(n_tokens, free, model.snapshot(), prefill, config, tokens, text, meta["chat"])
