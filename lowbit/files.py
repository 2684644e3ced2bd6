"""Files that survive faults: atomic writes, staging paths owned by a process, manifests of sizes and hashes.

Every result is written under a hidden staging name that records its owner (pid and process start time),
synced to disk and renamed into place in one step, so a reader sees a whole result or none. A process killed
before the rename leaves only staging paths; the next run or export in the same folder recognises those whose
owner is gone and removes them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")
MANIFEST = "manifest.json"
_STAGING = re.compile(r"^\.(?P<final>.+)\.lowbit-partial\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-f]+$")
_OLD_STAGING = re.compile(r"^\..+\.tmp-\w+$")  # lowbit before owner-named staging: no owner to check


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_alive(pid: int, start: int) -> bool:
    """Whether the process that created a staging path still runs (same pid and start time: pids are reused)."""
    if Path("/proc/self/stat").exists():
        return _process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_utf8_path(path: Path, what: str) -> None:
    """Refuse a path with bytes that are not UTF-8: tokenizers and safetensors cannot open or write it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise LowbitError(f"{what} {str(path).encode('utf-8', 'backslashreplace').decode()} is not valid UTF-8: "
                          f"choose a UTF-8 name") from None


def staging_path(final: Path) -> Path:
    """A hidden sibling of `final` that names this process as its owner (pid, start time)."""
    pid = os.getpid()
    start = _process_start(pid) or 0
    return final.parent / f".{final.name}.lowbit-partial.{pid}.{start}.{secrets.token_hex(3)}"


def sweep_leftovers(folder: Path, keep: tuple[str, ...] = ()) -> list[Path]:
    """Remove staging paths in `folder` whose owning process has ended (killed mid-write); returns them.

    Files named in `keep` (e.g. diagnostics) are first moved out of a dead staging folder to FINAL.NAME. A staging
    folder holding a block checkpoint (see lowbit.checkpoint) is kept: `lowbit run --resume` continues it."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if _OLD_STAGING.match(path.name):
            log.warning("%s looks like an unfinished result of an older lowbit; remove it if no lowbit is running",
                        path)
        m = _STAGING.match(path.name)
        if m is None or _owner_alive(int(m["pid"]), int(m["start"])) or resumable(path):
            continue
        if path.is_dir() and not path.is_symlink():
            for name in keep:
                if (path / name).is_file():
                    try:
                        kept = publish(path / name, path.parent / f"{m['final']}.{name}", unique=True)
                    except FileNotFoundError:  # a lowbit starting at the same time swept this folder first
                        continue
                    log.warning("kept %s from an interrupted lowbit process (pid %s)", kept, m["pid"])
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted lowbit process (pid %s)", path, m["pid"])
        removed.append(path)
    return removed


def resumable(path: Path) -> bool:
    """True for a run folder with a complete block checkpoint in it."""
    return path.is_dir() and any((path / "checkpoint").glob("block-*/manifest.json"))


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under `path`, to disk."""
    paths = [path] if path.is_file() else [*sorted(path.rglob("*")), path]
    for p in paths:
        if p.is_symlink():
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write `data` to `path` via a staging file, fsync and rename: readers see the old file or the new one.
    `data` may be a function that writes the staging file itself (no copy of large contents in memory)."""
    tmp = staging_path(path)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        fsync_tree(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish(staging: Path, final: Path, unique: bool) -> Path:
    """Rename a finished staging folder or file to `final`, never over an existing result.

    If `final` appeared meanwhile (e.g. a concurrent run of the same recipe), `unique` picks the first free
    name `final-2`, `final-3`, ...; otherwise the result stays complete under its staging name and the error
    says where."""
    fsync_tree(staging)
    candidates = [final] + ([final.with_name(f"{final.name}-{i}") for i in range(2, 1000)] if unique else [])
    for target in candidates:
        if target.exists() or target.is_symlink():
            continue
        try:
            if staging.is_dir():
                os.rename(staging, target)  # fails if target became a non-empty folder meanwhile
            else:
                _link_file(staging, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                continue
            raise
        _fsync_dir(target.parent)
        return target
    kept = staging.with_name(staging.name.replace(".lowbit-partial.", ".lowbit-unpublished.", 1))
    os.rename(staging, kept)
    raise LowbitError(f"{final} was created by another process while this one worked: the finished result is "
                      f"kept in {kept}; rename it to use it")


def _link_file(staging: Path, target: Path) -> None:
    """Move a file to `target` without replacing an existing one (hard link, else a checked rename)."""
    try:
        os.link(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(staging, target)
        return
    staging.unlink()


def write_error(exc: BaseException) -> str:
    """What went wrong in a failed write, in a few words (OSError, or safetensors' own error wrapping one)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return "No space left on device" if "No space left" in text else text


def file_digest(path: Path, h) -> str:
    """Hex digest of a file's bytes, read in 4 MB chunks into the hash object `h` (hashlib's or xxhash's)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, hashlib.sha256())


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    """Record size and sha256 of every file under `folder` in manifest.json (written atomically)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST and not path.name.startswith("."):
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {**(extra or {}), "files": files}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None for a folder written before manifests existed."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, OSError, AttributeError) as exc:
        raise LowbitError(f"{path} is damaged ({exc}): the folder cannot be trusted; rerun to write it again") from None
    return manifest


def check_manifest(folder: Path, what: str, fix: str, only: tuple[str, ...] | None = None) -> dict | None:
    """Check the files listed in the folder's manifest (or just `only` of them) for presence, size and sha256;
    name the first bad one."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for rel, info in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        path = folder / rel
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != info.get("size"):
            problem = f"has {path.stat().st_size} bytes, {info.get('size')} were written (truncated or replaced)"
        elif file_sha256(path) != info.get("sha256"):
            problem = "has changed since it was written (sha256 differs)"
        else:
            continue
        raise LowbitError(f"{what} {folder} is damaged: {rel} {problem}; {fix}")
    return manifest
