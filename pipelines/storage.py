"""Where Block Studio keeps files, and how it writes them so that a crash never leaves half a file.

Every file the project writes for users goes through `atomic_file` or `atomic_dir`: the content is written
under a temporary name beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def home_dir() -> Path:
    """Block Studio's data folder: $BLOCKSTUDIO_HOME, else ~/.cache/blockstudio."""
    env = os.environ.get("BLOCKSTUDIO_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blockstudio"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `path` (replacing an older one), else it is removed.

    The old folder stays in place until the new one is complete, and is removed only after the swap.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    try:
        yield staging
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            try:
                os.replace(staging, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def check_writable_target(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if `path` cannot be created or replaced as a folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path {path} exists and is not a folder")
    parent = path.parent
    probe_from = parent
    while not probe_from.exists():
        probe_from = probe_from.parent
    if not probe_from.is_dir() or not os.access(probe_from, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable ({probe_from} does not accept new files)")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable ({parent} does not accept new files)")
    return path
