"""File helpers shared by every module that writes or checks files: one home for atomic
writes and checksums."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing a file; what was written before is intact."""


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see all of it or
    none. The temporary name is unique to this process, so two processes never share one.
    A full disk raises ``DiskFullError`` naming the file; the old ``path`` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if not isinstance(err, DiskFullError) and _is_disk_full(err, path):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}: free space and rerun the same "
                                              "command; it resumes from what was written before") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_unbuffered(path: Path, memory, size: int) -> None:
    """Write the first ``size`` bytes of ``memory`` (an ``mmap.mmap``: page-aligned, at least
    ``size`` rounded up to a page long) to a new file ``path``, past the page cache (O_DIRECT)
    where the file system allows it, else with a plain write. The direct write moves the
    pages without copying them into the kernel: a harvest's writer thread then leaves the CPU
    to the forward pass (a 64 MiB shard: 0.01 s of CPU instead of 0.1 to 0.6 s).
    Raises OSError naming ``path`` if the file does not end up ``size`` bytes long."""
    import mmap

    path = Path(path)
    view = memoryview(memory)
    padded = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    direct = getattr(os, "O_DIRECT", 0)
    if direct and len(view) >= padded:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O
                raise
        else:
            try:
                written = 0
                while written < padded:  # whole pages from a page-aligned buffer: what O_DIRECT asks
                    written += os.write(fd, view[written:padded])
                os.ftruncate(fd, size)  # drop the padding of the last page
                return _check_size(path, size)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
            finally:
                os.close(fd)
    with open(path, "wb") as handle:
        handle.write(view[:size])
    _check_size(path, size)


def _check_size(path: Path, size: int) -> None:
    actual = os.stat(path).st_size
    if actual != size:
        raise OSError(f"{path}: wrote {actual} bytes instead of {size}")


def _is_disk_full(err: OSError, path: Path) -> bool:
    """ENOSPC / EDQUOT, or a short write with no errno (numpy's ``tofile`` reports a full disk
    as "N requested and M written") on a file system that has next to no space left."""
    import shutil

    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if err.errno is None and "requested and" in str(err):
        try:
            return shutil.disk_usage(path.parent).free < 16 * 2**20
        except OSError:
            return True
    return False


def write_text_atomic(path: Path, text: str) -> None:
    """``write_atomic`` for a text file (UTF-8)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, value, **dumps_kwargs) -> None:
    """``write_atomic`` for a JSON file (indented, one trailing newline)."""
    write_text_atomic(path, json.dumps(value, indent=dumps_kwargs.pop("indent", 1), **dumps_kwargs) + "\n")


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def content_digest(value) -> str:
    """Hex sha256 of nested dicts / lists of tensors, arrays and plain values, independent of
    the file format they are saved in: a checksum that travels *inside* a checkpoint (so the
    file and its checksum are written in one atomic step) and that flipped bytes in any
    weight change."""
    import numpy as np
    import torch

    digest = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, dict):
            for key in sorted(item, key=str):
                digest.update(f"<{key!s}>".encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(b"[")
            for element in item:
                feed(element)
            digest.update(b"]")
        elif isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(item, np.ndarray):
            digest.update(f"{item.dtype}{item.shape}".encode() + np.ascontiguousarray(item).tobytes())
        else:
            digest.update(repr(item).encode())

    feed(value)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs on this machine (also when another user owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_tmp(folder: Path) -> list[Path]:
    """Delete the ``*.<pid>.tmp`` files ``write_atomic`` left in ``folder`` when its process was
    killed (their pid is no longer running on this machine); returns what was removed. A
    resumed writer calls this, so killed runs do not pile up half-written shards."""
    removed = []
    for tmp in Path(folder).glob("*.tmp"):
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue  # not ours to judge, or its writer is still at work
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's writer lock."""


LOCK_FILE = ".writer.lock"


def acquire_lock(folder: Path, what: str = "folder") -> Path:
    """Make this process the only writer of ``folder``: create ``.writer.lock`` (exclusively)
    holding our pid and host. A lock whose process is gone (same host, pid not running) is
    stale and taken over, by one process however many find it at once (``_remove_stale``);
    one of a live process raises ``FolderLockedError`` naming it. A
    lock of this very process (an earlier writer that failed in a notebook) is taken over.

    The lock appears with its content already in it: written to a temporary file first, then
    hard-linked to the lock's name, which fails if a lock is there. Created empty and then
    written, another process could read it in between and could not say whose it was."""
    import socket

    folder = Path(folder)
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = folder / f"{LOCK_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(50):
            try:
                _create_exclusively(path, tmp)
                return path
            except FileExistsError:
                pass
            text = None
            try:
                text = path.read_text()
                owner = json.loads(text or "{}")
            except FileNotFoundError:
                continue  # released this instant: try again
            except (OSError, ValueError):
                owner = {}  # garbled (or written by a saelib before the link): judge by age below
            pid, host = owner.get("pid"), owner.get("host")
            if pid == me["pid"] and host == me["host"]:
                return path
            dead = isinstance(pid, int) and host == me["host"] and not _pid_alive(pid)  # its writer was killed
            if dead or (not owner and time.time() - path.stat().st_mtime > 60):  # or died mid-write
                _remove_stale(path, text)
                continue
            holder = (f"process {pid} on {host} (since {owner.get('since', '?')})" if owner
                      else "a process whose lock file is damaged or being written this instant")
            raise FolderLockedError(
                f"{what} {folder} is being written by {holder}: wait for it to finish, or if that process is "
                f"gone, delete {path} and run again") from None
    finally:
        tmp.unlink(missing_ok=True)
    raise FolderLockedError(f"could not take the writer lock {path}: delete it if no other process writes {folder}")


def _remove_stale(path: Path, text: str | None) -> None:
    """Delete the lock ``path`` judged stale while it held ``text``, unless it has changed since.
    Two processes can judge one stale lock at once; the slower, still judging when the faster
    has removed it and taken the folder, must not delete the faster one's fresh lock. So the
    lock is read again and deleted under a short-lived second lock (``.takeover``), which
    only one process at a time can hold; a takeover lock left by a process killed in those
    few microseconds is cleared after ten seconds."""
    takeover = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - takeover.stat().st_mtime > 10:
                takeover.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.01)  # another process is taking over: look at the lock again after it
        return
    try:
        if path.read_text() == text:
            path.unlink()
    except OSError:
        pass  # gone already, or unreadable: the caller looks again, and in the end names the lock to delete
    finally:
        takeover.unlink(missing_ok=True)


def _create_exclusively(path: Path, written: Path) -> None:
    """Give the complete file ``written`` the name ``path``; FileExistsError if ``path`` exists.
    Where the file system has no hard links, create ``path`` exclusively and copy it in."""
    try:
        os.link(written, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some FUSE and FAT file systems): create, then write
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(written.read_bytes())


def release_lock(path: Path) -> None:
    """Remove a lock ``acquire_lock`` returned, if it is still ours."""
    try:
        if json.loads(Path(path).read_text()).get("pid") == os.getpid():
            Path(path).unlink()
    except (OSError, ValueError):
        pass
