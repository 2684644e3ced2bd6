"""Fault injection: signals, full and read-only disks, damaged files, concurrent runs, hostile input.

Each case checks what a user relies on: exit code 2 (or the signal's), one line on stderr and no traceback,
no staging debris once the next run has passed, and earlier results unchanged byte for byte.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lowbit.cli import main
from lowbit.errors import LowbitError

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("fault_child.py")
W4_G32 = {"bits": 4, "group_size": 32, "symmetric": True}


# --- helpers ---

@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Baseline and model caches in a folder of this test session, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "lowbit-cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    return cache


def recipe_file(folder: Path, model: Path, **changes) -> Path:
    data = {"name": "tiny", "model": str(model), "weights": W4_G32, "threads": 1,
            "calibration": {"n_samples": 2, "seq_len": 64},
            "evaluation": {"seq_len": 64, "max_tokens": 256, "baseline": False}, **changes}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every result file under `folder` by relative path (hidden staging paths and the block
    diagnostics an interrupted run keeps beside its output left out)."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in files.items()
            if not any(part.startswith(".") for part in rel.split("/")) and not rel.endswith(".blocks.jsonl")}


def kept_diagnostics(folder: Path) -> list[list[int]]:
    """Block indices in each OUT.blocks.jsonl an interrupted run left in `folder`."""
    from lowbit.diagnostics import read_blocks

    return [[row["index"] for row in read_blocks(p)] for p in sorted(folder.glob("*.blocks.jsonl"))]


def hidden(folder: Path) -> list[str]:
    """Names of hidden entries anywhere under `folder`: where staging debris would be."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*"))


def cli(capsys, *argv) -> tuple[int, str, str]:
    """Exit code, stderr and stdout of an in-process CLI call; stderr must be at most one line, no traceback."""
    capsys.readouterr()
    code = main([a if isinstance(a, str) else os.fspath(a) if isinstance(a, Path) else str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) <= 1, captured.err
    return code, captured.err.strip(), captured.out


def spawn(tmp_path: Path, *argv, stop: str | None = None, when: str = "before") -> tuple[subprocess.Popen, Path]:
    """Start the CLI in a child process (optionally held at a stop point); returns it and its ready file."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    cmd = ([sys.executable, str(CHILD), stop, str(ready), when, "--"] if stop
           else [sys.executable, "-m", "lowbit"]) + [str(a) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def wait_ready(proc: subprocess.Popen, ready: Path) -> None:
    """Wait until the child reaches its stop point (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + 300
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"child ended before its stop point: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never reached its stop point")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def saved_run(tiny_llama, tmp_path_factory) -> Path:
    """A finished run of the tiny Llama, and its compressed-tensors export inside it."""
    from lowbit.export import export_run
    from lowbit.recipe import load_recipe
    from lowbit.run import run_recipe

    folder = tmp_path_factory.mktemp("saved")
    run = run_recipe(load_recipe(recipe_file(folder, tiny_llama)), folder / "runs" / "first", progress=False).out_dir
    export_run(run, "compressed-tensors", dtype="float32")
    return run


def copy_run(run: Path, dest: Path) -> Path:
    """A byte copy of a run folder, to damage without touching the shared one."""
    for p in run.rglob("*"):
        target = dest / p.relative_to(run)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dest


# --- signals: SIGTERM unwinds cleanly, SIGKILL leaves only recognisable staging that the next run sweeps ---

@pytest.mark.parametrize("stop,when", [("lowbit.run:compress", "before"),
                                       ("lowbit.runfolder:save_state", "after")])
def test_sigterm_during_run_removes_staging(tiny_llama, saved_run, tmp_path, stop, when):
    runs = tmp_path / "runs"
    copy_run(saved_run, runs / "earlier")
    before = snapshot(runs)
    proc, ready = spawn(tmp_path, "run", recipe_file(tmp_path, tiny_llama), "--quiet", stop=stop, when=when)
    wait_ready(proc, ready)
    assert [p.name for p in runs.iterdir() if ".lowbit-partial." in p.name]  # the run was writing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["lowbit: interrupted by SIGTERM; unfinished output removed"]
    assert hidden(runs) == [] and [p.name for p in runs.iterdir() if p.is_dir()] == ["earlier"]
    assert snapshot(runs) == before
    assert kept_diagnostics(runs) == ([] if stop.endswith("compress") else [[0, 1]])  # finished blocks' records


def test_sigkill_during_run_leaves_recognisable_staging_swept_next_time(tiny_llama, saved_run, tmp_path):
    from lowbit.files import _STAGING
    from lowbit.recipe import load_recipe
    from lowbit.run import run_recipe

    runs = tmp_path / "runs"
    copy_run(saved_run, runs / "earlier")
    before = snapshot(runs / "earlier")
    recipe = recipe_file(tmp_path, tiny_llama)
    proc, ready = spawn(tmp_path, "run", recipe, "--quiet", stop="lowbit.runfolder:save_state", when="after")
    wait_ready(proc, ready)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    (left,) = [p for p in runs.iterdir() if p.name.startswith(".")]
    owner = _STAGING.match(left.name)
    assert owner and int(owner["pid"]) == proc.pid and owner["final"].startswith("tiny-")
    assert (left / "model").is_dir() and not (left / "manifest.json").exists()  # never mistaken for a result
    with pytest.raises(LowbitError, match="not a lowbit run folder"):
        from lowbit.runfolder import load_run
        load_run(runs / owner["final"])

    assert kept_diagnostics(runs) == []
    after = run_recipe(load_recipe(recipe), runs / "next", progress=False)
    assert after.out_dir == runs / "next" and not left.exists() and hidden(runs) == []
    assert (runs / f"{owner['final']}.blocks.jsonl").exists() and kept_diagnostics(runs) == [[0, 1]]
    assert snapshot(runs / "earlier") == before


def test_signals_during_export(saved_run, tmp_path):
    """SIGTERM before the export is renamed into place: nothing left; SIGKILL: debris swept by the next export."""
    run = copy_run(saved_run, tmp_path / "run")
    before = snapshot(run)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc, ready = spawn(tmp_path, "export", run, "--format", "gguf-q4_0", "--quiet",
                            stop="lowbit.export.base:publish")
        wait_ready(proc, ready)
        assert [p.name for p in run.iterdir() if ".lowbit-partial." in p.name]
        proc.send_signal(sig)
        _, err = proc.communicate()
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + sig and err.strip().splitlines() == [
                "lowbit: interrupted by SIGTERM; unfinished output removed"]
            assert hidden(run) == []
        else:
            assert proc.returncode == -sig and len(hidden(run)) == 1
        assert snapshot(run) == before
    from lowbit.export import export_run

    out = export_run(run, "gguf-q4_0").path
    assert out == run / "gguf-q4_0.gguf" and hidden(run) == []
    assert {k: v for k, v in snapshot(run).items() if k != out.name} == before


# --- concurrent runs of one recipe ---

def test_runs_finishing_into_the_same_name_both_survive(tiny_llama, tmp_path, monkeypatch):
    from lowbit import run as run_module
    from lowbit.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "default_out_dir", lambda recipe: Path("runs") / "same-second")
    recipe = load_recipe(recipe_file(tmp_path, tiny_llama))
    first = run_module.run_recipe(recipe, progress=False).out_dir
    kept = snapshot(tmp_path / first)
    second = run_module.run_recipe(recipe, progress=False).out_dir
    assert (first, second) == (Path("runs/same-second"), Path("runs/same-second-2"))
    assert snapshot(tmp_path / first) == kept and hidden(tmp_path / "runs") == []
    ids = {json.loads((tmp_path / d / "metrics.json").read_text())["run_id"] for d in (first, second)}
    assert len(ids) == 2


def test_concurrent_processes_of_one_recipe(tiny_llama, tmp_path):
    recipe = recipe_file(tmp_path, tiny_llama)
    procs = [spawn(tmp_path, "run", recipe, "--quiet")[0] for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    saved = sorted(line.split("saved to ", 1)[1] for out, _ in outs for line in out.splitlines()
                   if line.startswith("saved to "))
    assert len(set(saved)) == 2 and all(err == "" for _, err in outs)
    from lowbit.runfolder import check_run_folder
    for folder in saved:
        assert check_run_folder(tmp_path / folder)["files"]
    assert hidden(tmp_path / "runs") == []


# --- disks: full, read-only, a path under a regular file ---

@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (needs root); yields a function mount(size, readonly) -> path."""
    mounts = []

    def mount(size: str, readonly: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(point)
        return point
    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_free_space_is_checked_before_loading(tiny_llama, tmp_path, monkeypatch, capsys):
    import shutil

    from lowbit import run as run_module

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    code, err, _ = cli(capsys, "run", recipe_file(tmp_path, tiny_llama), "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "has 1 MB free but the run needs about" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def _full_disk_writer(monkeypatch):
    """Make safetensors writes fail half-way with ENOSPC, as on a full disk."""
    import transformers.modeling_utils as mu

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(mu, "safe_save_file", full)


@pytest.mark.parametrize("how", ["tmpfs", "patched writer"])
def test_full_disk_during_save(tiny_llama, saved_run, tmp_path, monkeypatch, capsys, tmpfs, how):
    import shutil

    if how == "tmpfs":
        root = tmpfs("300k")
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**12))  # pass the early check
    else:
        root = tmp_path / "disk"
        _full_disk_writer(monkeypatch)
    if how != "tmpfs":
        copy_run(saved_run, root / "earlier")
    before = snapshot(root)
    code, err, _ = cli(capsys, "run", recipe_file(tmp_path, tiny_llama), "--out", root / "new", "--quiet")
    assert code == 2 and err.startswith("lowbit: error: writing the run failed: No space left on device")
    assert hidden(root) == [] and not (root / "new").exists() and snapshot(root) == before
    assert kept_diagnostics(root) == [[0, 1]]


def test_full_disk_while_keeping_a_streamed_blocks_state(tiny_llama, tmp_path, monkeypatch, capsys):
    """A streamed run writes each finished block's quantization state to disk; a full disk there is the same
    one-line refusal as anywhere else, and nothing is left behind."""
    import torch

    real = torch.save

    def full(obj, f, *args, **kwargs):
        if hasattr(f, "name") and ".state-" in str(f.name):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full)
    root = tmp_path / "disk"
    root.mkdir()
    code, err, _ = cli(capsys, "run", recipe_file(tmp_path, tiny_llama, stream=True), "--out", root / "new", "--quiet")
    assert code == 2 and err.startswith("lowbit: error: writing the run failed: No space left on device"), err
    assert "(after block 0)" in err and len(err.strip().splitlines()) == 1
    assert hidden(root) == [] and not (root / "new").exists()


def test_full_disk_during_export(saved_run, tmp_path, monkeypatch, capsys):
    run = copy_run(saved_run, tmp_path / "run")
    before = snapshot(run)
    _full_disk_writer(monkeypatch)
    code, err, _ = cli(capsys, "export", run, "--format", "compressed-tensors", "--out", run / "ct2", "--quiet")
    assert code == 2 and "No space left on device" in err and "nothing was written" in err
    assert hidden(run) == [] and snapshot(run) == before


@pytest.mark.parametrize("how", ["under a file", "read-only tmpfs", "read-only folder"])
def test_unwritable_output(tiny_llama, tmp_path, capsys, tmpfs, how):
    if how == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif how == "read-only tmpfs":
        out = tmpfs("1m", readonly=True) / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    code, err, _ = cli(capsys, "run", recipe_file(tmp_path, tiny_llama), "--out", out, "--quiet")
    assert code == 2 and err.startswith(f"lowbit: error: cannot write the output folder {out}")


# --- damaged files of every kind lowbit reads ---

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


RUN_FILES = ["model/model.safetensors", "model/config.json", "model/tokenizer.json", "quant_state.json",
             "quant_state.safetensors", "metrics.json", "recipe.yaml"]


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "corrupted"])
@pytest.mark.parametrize("rel", RUN_FILES)
def test_damaged_run_file_is_named(saved_run, tmp_path, capsys, rel, damage):
    run = copy_run(saved_run, tmp_path / "run")
    damage(run / rel)
    commands = [["eval", run, "--seq-len", 64, "--max-tokens", 128, "--quiet"],
                ["export", run, "--format", "gguf-q8_0", "--quiet"]]
    for argv in commands + ([["report", run]] if rel == "metrics.json" else []):  # report reads only metrics
        code, err, _ = cli(capsys, *argv)
        assert code == 2 and err.startswith(f"lowbit: error: run folder {run} is damaged: {rel} ")
    assert hidden(run) == [] and not (run / "gguf-q8_0.gguf").exists()


@pytest.mark.parametrize("rel,message", [
    ("model/model.safetensors", "could not load model"), ("model/config.json", "could not load model"),
    ("quant_state.json", "quantization state in"), ("quant_state.safetensors", "quantization state in"),
    ("metrics.json", "metrics.json is damaged")])
def test_damaged_file_without_manifest_is_one_line(saved_run, tmp_path, capsys, rel, message):
    """Folders from before manifests: a broken file still gives one line naming it, never a traceback."""
    run = copy_run(saved_run, tmp_path / "run")
    (run / "manifest.json").unlink()
    _truncate(run / rel)
    command = ["report", run] if rel == "metrics.json" else ["export", run, "--format", "gguf-q4_0"]
    code, err, _ = cli(capsys, *command)
    assert code == 2 and err.startswith("lowbit: error: ") and message in err
    assert hidden(run) == [] and not (run / "gguf-q4_0.gguf").exists()


def test_damaged_manifest(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path / "run")
    (run / "manifest.json").write_text("{not json")
    code, err, _ = cli(capsys, "report", run)
    assert code == 2 and err.startswith(f"lowbit: error: {run / 'manifest.json'} is damaged")


def _break_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[9] ^= 0xFF  # inside the JSON header of a safetensors file, the first byte of a JSON file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _break_header], ids=["truncated", "corrupted"])
@pytest.mark.parametrize("rel", ["model.safetensors", "config.json", "tokenizer.json"])
def test_damaged_model_folder(tiny_llama, tmp_path, capsys, damage, rel):
    model = copy_run(tiny_llama, tmp_path / "model")
    damage(model / rel)
    code, err, _ = cli(capsys, "eval", model, "--seq-len", 64, "--max-tokens", 128, "--quiet")
    assert code == 2 and err.startswith("lowbit: error: could not ")


def test_evaluation_window_longer_than_the_context(tiny_llama, capsys):
    code, err, _ = cli(capsys, "eval", tiny_llama, "--seq-len", 1024, "--quiet")
    assert code == 2 and err == ("lowbit: error: evaluation windows of 1024 tokens are longer than the model's "
                                 "context (512 positions): use a seq_len of at most 512")


def test_damaged_cached_embedded_model(tiny_llama, private_cache, capsys):
    """The converted embedded model carries a manifest; a damaged copy is named with the fix."""
    from lowbit.files import write_manifest
    from lowbit.loading import embedded_model_path

    cached = copy_run(tiny_llama, private_cache / "models" / "smollm2-135m-instruct")
    write_manifest(cached)
    assert embedded_model_path() == cached
    _truncate(cached / "model.safetensors")
    code, err, _ = cli(capsys, "eval", "smollm2-135m", "--quiet")
    assert code == 2 and "the converted embedded model in" in err and f"delete {cached}" in err


def test_damaged_baseline_cache_is_recomputed(tiny_llama, tmp_path, private_cache):
    from lowbit.recipe import load_recipe
    from lowbit.run import run_recipe

    recipe = load_recipe(recipe_file(tmp_path, tiny_llama, save=False, evaluation={
        "seq_len": 64, "max_tokens": 256}))
    first = run_recipe(recipe, progress=False).metrics["ppl_fp"]
    for f in (private_cache / "baselines").glob("*.json"):
        f.write_text("{trunc")
    again = run_recipe(recipe, progress=False).metrics["ppl_fp"]
    assert again["cached"] is False and again["ppl"] == first["ppl"]


def test_pickle_only_folder_is_refused(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import torch

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the pickle format older checkpoints use
    code, err, _ = cli(capsys, "eval", folder, "--quiet")
    assert code == 2 and "pickle (pytorch_model.bin)" in err and "convert it to safetensors" in err


def test_damaged_export_and_verify(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path / "run")
    (run / "compressed-tensors" / "lowbit_provenance.json").write_text("{")
    code, err, _ = cli(capsys, "verify", run, run / "compressed-tensors", "--quiet")
    assert code == 2 and "lowbit_provenance.json is damaged" in err
    (tmp_path / "half.gguf").write_bytes(b"GGUF\x03\x00")
    code, err, _ = cli(capsys, "verify", run, tmp_path / "half.gguf", "--quiet")
    assert code == 2 and "is not a readable GGUF file" in err
    (run / "compressed-tensors" / "lowbit_provenance.json").write_bytes(
        (saved_run / "compressed-tensors" / "lowbit_provenance.json").read_bytes())
    _truncate(run / "compressed-tensors" / "model.safetensors")
    code, err, _ = cli(capsys, "verify", run, run / "compressed-tensors", "--quiet")
    assert code == 2 and f"could not load the export {run / 'compressed-tensors'} (is a file truncated" in err


# --- provenance and verify's verdict ---

def test_verify_refuses_an_export_of_another_run(tiny_llama, saved_run, tmp_path, capsys):
    from lowbit.export import export_run
    from lowbit.export.base import export_provenance
    from lowbit.recipe import load_recipe
    from lowbit.run import run_recipe
    from lowbit.runfolder import provenance

    other = run_recipe(load_recipe(recipe_file(tmp_path, tiny_llama, weights={"bits": 4, "group_size": 32,
                                                                               "symmetric": False})),
                       tmp_path / "other", progress=False).out_dir
    gguf = export_run(saved_run, "gguf-q4_0", tmp_path / "first.gguf").path
    assert export_provenance(gguf) == provenance(saved_run) == export_provenance(saved_run / "compressed-tensors")
    assert provenance(saved_run)["run_id"] == json.loads((saved_run / "metrics.json").read_text())["run_id"]
    for export in (saved_run / "compressed-tensors", gguf):
        code, err, _ = cli(capsys, "verify", other, export, "--quiet")
        assert code == 2 and "was exported from run" in err and f"not from {other}" in err


def test_verify_exit_code_follows_the_tolerances(saved_run, capsys):
    argv = ["verify", saved_run, saved_run / "compressed-tensors", "--seq-len", 64, "--max-tokens", 256, "--quiet"]
    code, err, out = cli(capsys, *argv, "--min-top1", "1", "--max-ppl-diff", "0")
    assert code == 0 and err == ""  # the float32 export reproduces the run exactly
    assert json.loads(out)["top1_agreement"] == 1.0
    from lowbit.export import export_run

    bf16 = export_run(saved_run, "compressed-tensors", saved_run.parent / "bf16").path
    code, err, out = cli(capsys, "verify", saved_run, bf16, "--seq-len", 64, "--max-tokens", 256, "--quiet",
                         "--max-ppl-diff", "0")
    assert code == 1 and err.startswith("lowbit: check failed: the export does not reproduce the run: perplexity")
    assert json.loads(out)["ppl_rel_diff"] > 0  # the numbers are still reported


# --- input checked before any weight loads ---

def test_impossible_group_size_fails_before_loading(tiny_llama, tmp_path, monkeypatch, capsys):
    from lowbit import run as run_module

    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("weights loaded before validation"))
    path = recipe_file(tmp_path, tiny_llama, weights={"bits": 4, "group_size": 48})
    code, err, _ = cli(capsys, "run", path, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "group size 48 does not divide the width 64" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights,keys", [
    ({"bits": 8, "format": "int", "fp_variant": "e4m3"}, ("fp_variant", "format: int")),
    ({"bits": 8, "format": "fp", "symmetric": False}, ("symmetric: false", "format: fp")),
    ({"bits": 4, "granularity": "tensor", "group_size": 32}, ("group_size: 32", "granularity: tensor")),
])
def test_contradictory_keys_name_both(tiny_llama, tmp_path, capsys, weights, keys):
    code, err, _ = cli(capsys, "run", recipe_file(tmp_path, tiny_llama, weights=weights), "--quiet")
    assert code == 2 and err.startswith("lowbit: error: recipe error at weights: ")
    assert all(k in err for k in keys)


def test_hostile_run_name_stays_under_runs(tiny_llama, tmp_path, monkeypatch):
    from lowbit.recipe import load_recipe
    from lowbit.run import run_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(recipe_file(tmp_path, tiny_llama, name="../../escape/\x00 me"))
    out = run_recipe(recipe, progress=False).out_dir
    assert out.parent == Path("runs") and out.name.startswith("escape-me-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "runs"]


def test_local_looking_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in ("runs/typo", "./typo", "/nonexistent/model"):
        code, err, _ = cli(capsys, "eval", path, "--quiet")
        assert code == 2 and err.startswith(f"lowbit: error: model path {path} does not exist")
    from lowbit.data import load_text
    with pytest.raises(LowbitError, match="text file runs/notes does not exist"):
        load_text("runs/notes")


# --- hostile numbers and bytes on the command line and in files ---

@pytest.mark.parametrize("argv,match", [
    (["eval", "m", "--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
    (["eval", "m", "--max-tokens", "-5"], "argument --max-tokens: must be at least 0, got -5"),
    (["eval", "m", "--threads", "-1"], "argument --threads: must be at least 1, got -1"),
    (["eval", "m", "--threads", "100000"], "argument --threads: must be at most"),
    (["eval", "m", "--seq-len", "1e9"], "expected a whole number, got '1e9'"),
    (["quantize", "--nsamples", "0"], "argument --nsamples: must be at least 1"),
    (["quantize", "--group-size", "-32"], "argument --group-size: must be at least 0"),
    (["quantize", "--calib-seq-len", "nan"], "expected a whole number"),
    (["verify", "r", "e", "--min-top1", "nan"], "argument --min-top1: must be between 0 and 1"),
    (["verify", "r", "e", "--min-top1", "1.5"], "must be between 0 and 1"),
    (["verify", "r", "e", "--max-ppl-diff", "-0.1"], "must be a finite number >= 0"),
    (["verify", "r", "e", "--max-ppl-diff", "inf"], "must be a finite number >= 0"),
    (["generate", "r", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["bench", "layers", "--repeats", "-1"], "argument --repeats: must be at least 1"),
    (["quantize", "--wbits", "0"], "argument --wbits: must be 2 to 8, or 16 to keep FP, got 0"),
    (["quantize", "--abits", "99999999999999999999"], "argument --abits: must be 2 to 8, or 16"),
    (["kernels", "r", "--seq-len", "99999999999999999999999", "--max-tokens", "-1"], "--max-tokens"),
])
def test_hostile_numbers_are_one_line(capsys, argv, match):
    code, err, _ = cli(capsys, *argv)
    assert code == 2 and err.startswith("lowbit: error: ") and match in err


def test_non_utf8_inputs(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    code, err, _ = cli(capsys, "run", recipe, "--quiet")
    assert code == 2 and err == f"lowbit: error: recipe {recipe} is not UTF-8 text (byte 0xe9 at offset 9): save it as UTF-8"
    text = tmp_path / "text.txt"
    text.write_bytes(b"hello \xff\xfe world " * 100)
    code, err, _ = cli(capsys, "eval", tiny_llama, "--data", text, "--seq-len", 8, "--quiet")
    assert code == 2 and "is not UTF-8 (byte 0xff at offset 6)" in err
    odd = os.fsdecode(b"r\xffun")  # a non-UTF-8 byte from the command line arrives as a surrogate
    path = recipe_file(tmp_path, tiny_llama)
    code, err, _ = cli(capsys, "run", path, "--set", f"name={odd}", "--quiet")
    assert code == 2 and err.startswith("lowbit: error: --set name: ")
    code, err, _ = cli(capsys, "run", path, "--out", tmp_path / odd, "--quiet")
    assert code == 2 and err.startswith(f"lowbit: error: output folder {tmp_path}/r\\udcffun is not valid UTF-8")
    code, err, _ = cli(capsys, "eval", tmp_path / odd, "--quiet")
    assert code == 2 and "model path" in err and "is not valid UTF-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.yaml", "recipe.yaml", "text.txt"]


# --- --quiet: nothing on stderr when all is well, one line when not ---

def test_quiet_success_is_silent_and_errors_are_one_line(saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path / "run")
    code, err, out = cli(capsys, "export", run, "--format", "gguf-q4_0", "--quiet")
    assert code == 0 and err == "" and out == f"exported to {run / 'gguf-q4_0.gguf'}\n"
    code, err, _ = cli(capsys, "export", run, "--format", "gguf-q4_0", "--quiet")
    assert code == 2 and err == f"lowbit: error: export path {run / 'gguf-q4_0.gguf'} already exists: choose another --out or remove it"


def test_hub_dataset_without_text_column(monkeypatch):
    import datasets

    from lowbit.data import load_text

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_dict({"content": ["a"], "label": [1]}))
    with pytest.raises(LowbitError, match="dataset 'org/data' has no 'text' column \\(it has content, label\\)"):
        load_text("org/data")


def test_unreachable_hub_dataset_is_one_line_naming_the_choices(monkeypatch, caplog):
    import logging

    import datasets

    from lowbit.data import load_text

    def offline(*_a, **_k):  # what the hub client does offline: a warning per retry, then the error
        logging.getLogger("huggingface_hub").warning("'[Errno -2] Name or service not known' thrown while requesting")
        raise ConnectionError("Couldn't reach 'nope' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    level = logging.getLogger("huggingface_hub").level
    with pytest.raises(LowbitError) as info:
        load_text("nope")
    assert str(info.value) == ("could not load dataset 'nope' split 'test': Couldn't reach 'nope' on the Hub "
                               "(LocalEntryNotFoundError) (shipped texts: wikitext2, lambada; or a .txt/.jsonl file, "
                               "or a Hub dataset 'name[:config]')")
    assert not [r for r in caplog.records if r.name == "huggingface_hub"]  # no retry warnings before the error
    assert logging.getLogger("huggingface_hub").level == level  # restored

def test_unreachable_hub_model_is_one_line_without_retry_warnings(monkeypatch, caplog):
    import logging

    import transformers

    from lowbit.loading import load_config

    def offline(*_a, **_k):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nsecond line")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(LowbitError) as info:
        load_config("org/nope")
    assert str(info.value) == ("could not read the config of model 'org/nope': We couldn't connect to "
                               "'https://huggingface.co' to load the files.")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]


def test_sweep_spares_live_owners_and_reports_old_leftovers(tmp_path, caplog):
    from lowbit.files import staging_path, sweep_leftovers

    mine = staging_path(tmp_path / "result")
    mine.mkdir()
    dead = tmp_path / ".result.lowbit-partial.999999999.1.abc123"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x")
    old = tmp_path / ".result-20261101-120000.tmp-k2j4"
    old.mkdir()
    with caplog.at_level("WARNING", logger="lowbit"):
        assert sweep_leftovers(tmp_path) == [dead]
    assert mine.exists() and old.exists() and not dead.exists()
    assert any(str(old) in r.message and "older lowbit" in r.message for r in caplog.records)


def test_two_lowbits_sweeping_one_dead_folder_at_once(tmp_path, monkeypatch):
    # Two runs starting together in one parent both sweep a dead run's staging folder; the one that comes second
    # finds the diagnostics already moved and must carry on, not fail.
    from lowbit import files

    dead = tmp_path / ".result.lowbit-partial.999999999.1.abc123"  # no such pid
    dead.mkdir()
    (dead / "blocks.jsonl").write_text("{}\n")
    real = files.publish

    def other_process_first(staging, final, unique):
        real(staging, final, unique)  # the other sweeper publishes it...
        return real(staging, final, unique)  # ...so this one's publish finds no file
    monkeypatch.setattr(files, "publish", other_process_first)
    assert files.sweep_leftovers(tmp_path, keep=("blocks.jsonl",)) == [dead]
    assert not dead.exists() and (tmp_path / "result.blocks.jsonl").read_text() == "{}\n"


def test_every_command_has_quiet_and_checked_numbers():
    from lowbit.cli import build_parser, commands

    found = commands(build_parser())
    assert {"run", "quantize", "eval", "export", "verify", "bench speed", "steps"} <= set(found)
    for name, parser in found.items():
        assert "--quiet" in parser.format_usage(), name
        plain = [a.dest for a in parser._actions if a.type in (int, float)]
        assert plain == [], f"{name}: {plain} accept any number; use a checked type (POSITIVE, NONNEGATIVE, ...)"
