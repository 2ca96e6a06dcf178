"""File helpers shared by every module that writes or checks files: one home for atomic
writes and checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see all of it or
    none. The temporary name is unique to this process, so two processes never share one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
