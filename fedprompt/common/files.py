"""Writing a file so that a crash at any moment leaves either the old content or the new, whole."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to a temporary file beside `path` (created with `mode`), fsync it, then rename
    it over `path` and fsync the folder, so the rename itself survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
