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

from pipelines.errors import BlockStudioError


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
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `path`, else it is removed.

    With `replace` an older `path` stays in place until the new one is complete and is removed only after the
    swap; without it, a `path` that exists when the staging folder is complete is left alone and the write fails.
    """
    staged = StagedDir(path, replace=replace)
    try:
        yield staged.staging
        staged.commit()
    finally:
        staged.discard()


class StagedDir:
    """A folder built under a temporary name beside `path` and renamed into place by `commit()`.

    What `atomic_dir` does, for a folder whose files arrive over several calls (a stream from another machine):
    until `commit()` nothing is at `path`; `discard()` removes an unfinished staging folder.
    """

    def __init__(self, path: str | os.PathLike, *, replace: bool = True) -> None:
        self.path = Path(path)
        self.replace = replace
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".staging", dir=self.path.parent))

    def commit(self) -> Path:
        path, staging = self.path, self.staging
        if path.exists() or path.is_symlink():
            if not self.replace:
                raise TargetExists(f"{path} appeared while it was being written; it was left as it is")
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
        return path

    def discard(self) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)


class TargetExists(BlockStudioError):
    """An output folder that holds something the command was not asked to replace."""


def is_package(folder: Path) -> bool:
    return (folder / "adapter.json").is_file() and not (folder / "adapter.json").is_symlink()


def _protected(path: Path) -> str | None:
    """Why `path` is never replaced, even with --force; None when it may be."""
    resolved = path.resolve()
    for keep, what in ((Path.cwd(), "the current folder"), (Path.home(), "your home folder"),
                       (home_dir(), "Block Studio's data folder")):
        keep = keep.resolve()
        if keep == resolved or keep.is_relative_to(resolved):
            return f"it is {what} or holds it"
    if resolved.parent == resolved:
        return "it is the root of the file system"
    with os.scandir(path) as entries:
        if any(e.is_dir(follow_symlinks=False) and is_package(Path(e.path)) for e in entries):
            return "it holds adapter packages; give a new folder inside it, e.g. " + str(path / "my-adapter")
    return None


def check_writable_target(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early, before any work, if `path` cannot be created, or replaced as asked, as a package folder.

    A missing or empty folder is fine. An existing package is replaced only with `force`; a folder of other
    files only with `force` too, and never one that holds packages, the data folder, the home or current folder.
    An `<out>.partial` that is not an unfinished Block Studio run is never touched.
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        raise TargetExists(f"output path {path} is a link; give a folder path")
    if path.exists() and not path.is_dir():
        raise TargetExists(f"output path {path} exists and is not a folder; choose a new name")
    if path.is_dir() and any(path.iterdir()):
        if is_package(path):
            if not force:
                raise TargetExists(f"{path} is an existing adapter package; pass --force to replace it, "
                                   "or choose a new name")
        else:
            reason = _protected(path)
            if reason:
                raise TargetExists(f"{path} is not an adapter package and is never replaced ({reason})")
            if not force:
                raise TargetExists(f"{path} holds files that are not an adapter package; choose a new name, "
                                   "or pass --force to replace that folder and everything in it")
    partial = path.parent / f"{path.name}.partial"
    if (partial.exists() or partial.is_symlink()) and (
        partial.is_symlink() or not partial.is_dir()
        or (any(partial.iterdir()) and not (partial / "job.json").is_file())
    ):
        raise TargetExists(f"{partial} exists and is not an unfinished Block Studio run; move it away or "
                           "choose a new name")
    parent = path.parent
    probe_from = parent
    while not probe_from.exists():
        probe_from = probe_from.parent
    if not probe_from.is_dir() or not os.access(probe_from, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable ({probe_from} does not accept new files)")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable ({parent} does not accept new files)")
    return path
