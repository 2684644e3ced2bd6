"""Resumable runs: an atomic checkpoint after every finished decoder block.

A checkpoint is a folder `checkpoint/block-NNNNN` (NNNNN = blocks finished) holding the next block's
calibration inputs (quantized and, when kept, full-precision path), the random generator state, the
quantization state of everything outside the finished blocks, and a manifest with the XXH3-128 checksum of these
files (a tenth of SHA-256's time on the 75 MB of inputs a block of the embedded model writes; the checksums catch
corruption, not tampering),
of every finished block's weights file and of its quantization state (written once, when the block finishes,
to `checkpoint/blocks/state-NNNNN`: sparsity masks are as large as the weights, so rewriting all of them at
every checkpoint would grow quadratically with the depth of the model). It is written under a temporary name
and renamed, then older ones are removed, so a process killed at any moment leaves the newest complete
checkpoint (at most the block in progress is lost).
A resume refuses a checkpoint whose recipe fingerprint differs (foreign) or whose files do not match their
hashes (corrupted), with a one-line error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.files import file_digest
from lowbit.runfolder import load_state, write_state
from lowbit.state import QuantState
from lowbit.streaming import write_tensors

FORMAT = "lowbit-checkpoint/3"
_DIR = re.compile(r"block-(\d{5})$")


def file_checksum(path: Path) -> str:
    """XXH3-128 of a file's bytes, as hex."""
    return file_digest(path, xxhash.xxh3_128())


@dataclass
class Resumed:
    """What a checkpoint restores: blocks finished, next inputs, RNG state, quantization state, block files."""

    finished: int
    inputs: torch.Tensor
    fp_inputs: torch.Tensor | None
    state: QuantState
    block_files: dict[int, Path]


class Checkpoints:
    """Writes and reads the checkpoints of one run folder; `fingerprint` identifies the recipe and model."""

    def __init__(self, run_dir: Path, fingerprint: str):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoint"
        self.fingerprint = fingerprint
        self.block_hashes: dict[str, str] = {}  # run-folder-relative path of each finished block's file -> hash
        self.states: dict[str, dict] = {}  # block name prefix -> its state folder: {"dir", "files": {name: hash}}

    def block_dir(self) -> Path:
        """Where finished blocks' weights go when the output model is not written block by block."""
        path = self.root / "blocks"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def record_block(self, path: Path) -> None:
        self.block_hashes[str(path.relative_to(self.run_dir))] = file_checksum(path)

    def save(self, finished: int, inputs: torch.Tensor, fp_inputs: torch.Tensor | None, state: QuantState,
             block_prefix: str) -> None:
        """Atomically write the checkpoint after `finished` blocks, then drop the older ones; the state of the
        block just finished (module names starting with `block_prefix`) goes to its own folder, once."""
        self.root.mkdir(parents=True, exist_ok=True)
        part = self.block_dir() / f"state-{finished - 1:05d}"
        part.mkdir(exist_ok=True)
        write_state(state.select(lambda n: n.startswith(block_prefix)), part)
        self.states[block_prefix] = {"dir": str(part.relative_to(self.run_dir)),
                                     "files": {p.name: file_checksum(p) for p in sorted(part.iterdir())}}
        done = tuple(self.states)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        tensors = {"inputs": inputs.detach().cpu().contiguous(), "rng": torch.get_rng_state()}
        if fp_inputs is not None:
            tensors["fp_inputs"] = fp_inputs.detach().cpu().contiguous()
        inputs_digest = xxhash.xxh3_128()  # (hashed as written: 75 MB per block of the embedded model)
        write_tensors(tmp / "inputs.safetensors", tensors, digest=inputs_digest)
        write_state(state.select(lambda n: not n.startswith(done)), tmp)
        files = {p.name: inputs_digest.hexdigest() if p.name == "inputs.safetensors" else file_checksum(p)
                 for p in sorted(tmp.iterdir())}
        manifest = {"format": FORMAT, "fingerprint": self.fingerprint, "finished": finished, "files": files,
                    "blocks": self.block_hashes, "states": self.states}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = self.root / f"block-{finished:05d}"
        os.replace(tmp, final)
        for old in self.root.iterdir():
            if old != final and (_DIR.match(old.name) or old.name.startswith(".tmp-")):
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        if not self.root.is_dir():
            return None
        done = sorted(p for p in self.root.iterdir() if _DIR.match(p.name) and (p / "manifest.json").is_file())
        return done[-1] if done else None

    def load(self) -> Resumed:
        """Verify and read the newest checkpoint; one-line errors for missing, foreign or corrupted ones."""
        path = self.latest()
        if path is None:
            raise LowbitError(f"{self.run_dir} has no checkpoint to resume from: start the run again without --resume")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LowbitError(f"checkpoint {path} is corrupted (unreadable manifest): remove {self.run_dir} and "
                              f"start again") from None
        if manifest.get("format") != FORMAT:
            raise LowbitError(f"checkpoint {path} is not a {FORMAT} checkpoint: resume only run folders written "
                              f"by this lowbit version")
        if manifest.get("fingerprint") != self.fingerprint:
            raise LowbitError(f"checkpoint {path} was written for a different recipe or model: resume with the "
                              f"recipe that started it, or start a new run")
        for name, digest in manifest["files"].items():
            self._verify(path / name, digest)
        for rel, digest in manifest["blocks"].items():
            self._verify(self.run_dir / rel, digest)
        for part in manifest["states"].values():
            for name, digest in part["files"].items():
                self._verify(self.run_dir / part["dir"] / name, digest)
        try:
            tensors = load_file(str(path / "inputs.safetensors"))
            state = load_state(path)
            for part in manifest["states"].values():
                state.update(load_state(self.run_dir / part["dir"]))
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise LowbitError(f"checkpoint {path} is unreadable ({exc}): remove {self.run_dir} and start again") from None
        torch.set_rng_state(tensors["rng"])
        self.block_hashes = dict(manifest["blocks"])
        self.states = dict(manifest["states"])
        files = {}
        for rel in manifest["blocks"]:
            match = re.search(r"(\d+)", Path(rel).name)
            files[int(match.group(1)) - 1] = self.run_dir / rel
        return Resumed(manifest["finished"], tensors["inputs"], tensors.get("fp_inputs"), state, files)

    def _verify(self, path: Path, digest: str) -> None:
        if not path.is_file() or file_checksum(path) != digest:
            raise LowbitError(f"checkpoint file {path} is missing or corrupted (hash mismatch): remove "
                              f"{self.run_dir} and start again")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
