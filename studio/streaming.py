"""A job's files between machines that share no disk: folders sent as chunks of bytes, written atomically.

A folder (a checkpoint, a package, a lab result) travels as one unit of events: `("open", area, name)`, then
`("file", path, offset, data)` chunks of each file in turn, then `("close",)`. The run's fingerprint file
(`job.json` of its work folder, which a resume checks) travels alone as `("run-file", data)`. The receiving side
writes a unit into a staging folder beside its target and renames it into place on "close", so a unit cut off
half-way leaves nothing behind. Where an area goes is the receiver's choice, never the sender's; every name,
offset and size it is sent is checked first, and anything else stops the transfer with `StreamError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.storage import StagedDir, atomic_file

CHUNK_BYTES = 8 * 1024**2
MAX_UNIT_BYTES = 32 * 1024**3  # a unit larger than any checkpoint or package is a runaway sender
MAX_UNIT_FILES = 1000
MAX_RUN_FILE_BYTES = 1024**2
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+\-]{0,127}"  # no leading dot: no "..", no hidden files
_RELATIVE_RE = re.compile(rf"{_PART}(?:/{_PART}){{0,3}}")
CHECKPOINT_NAME_RE = re.compile(r"checkpoint-\d{6}")
NO_NAME_RE = re.compile(r"")


class StreamError(RuntimeError):
    """Something sent over a job's stream that the receiver refuses; the unit it belonged to is dropped."""


def check_relative(path: object) -> str:
    """A relative path of at most four plain parts (letters, digits, `_.+-`, none starting with a dot)."""
    if not isinstance(path, str) or not _RELATIVE_RE.fullmatch(path):
        raise StreamError(f"refused a file path from the stream: {str(path)[:80]!r}")
    return path


@dataclass(frozen=True)
class Area:
    """Where the units of one area go on the receiving side, and what they may hold."""

    target: Callable[[str], Path]  # the unit's name -> the folder it becomes
    suffixes: frozenset[str]  # the file types it may hold
    names: re.Pattern = NO_NAME_RE  # what the unit's name must be (the empty name by default)
    replace: bool = True  # whether a unit replaces a folder already at its target
    on_commit: Callable[[Path], None] | None = None


@dataclass
class _Unit:
    staged: StagedDir
    area: Area
    sizes: dict[str, int] = field(default_factory=dict)
    total: int = 0


class Receiver:
    """Applies the events of a stream: files into staging folders, each unit renamed into place when complete."""

    def __init__(self, areas: dict[str, Area], run_file: Path | None = None) -> None:
        self.areas = areas
        self.run_file = run_file  # where a "run-file" goes (None: refused)
        self._unit: _Unit | None = None

    def apply(self, event: tuple) -> None:
        kind = event[0] if isinstance(event, tuple) and event else None
        if kind == "run-file" and len(event) == 2:
            self._run_file(event[1])
        elif kind == "open" and len(event) == 3:
            self._open(event[1], event[2])
        elif kind == "file" and len(event) == 4:
            self._chunk(event[1], event[2], event[3])
        elif kind == "close" and len(event) == 1:
            self._close()
        else:
            raise StreamError(f"refused an event the stream does not carry: {str(kind)[:40]!r}")

    def discard(self) -> None:
        """Drop a unit that was opened and never closed."""
        if self._unit is not None:
            self._unit.staged.discard()
            self._unit = None

    def _run_file(self, data: object) -> None:
        if self.run_file is None:
            raise StreamError("refused a run file: this stream carries none")
        if not isinstance(data, bytes) or len(data) > MAX_RUN_FILE_BYTES:
            raise StreamError("refused a run file that is not a small JSON file")
        try:
            if not isinstance(json.loads(data), dict):
                raise ValueError
        except ValueError:
            raise StreamError("refused a run file that is not a JSON object") from None
        with atomic_file(self.run_file) as tmp:
            tmp.write_bytes(data)

    def _open(self, area: object, name: object) -> None:
        if self._unit is not None:
            raise StreamError("refused a unit opened inside another")
        if not isinstance(area, str) or area not in self.areas:
            raise StreamError(f"refused a unit for an area this stream does not carry: {str(area)[:40]!r}")
        spec = self.areas[area]
        if not isinstance(name, str) or not spec.names.fullmatch(name):
            raise StreamError(f"refused a {area} named {str(name)[:40]!r}")
        self._unit = _Unit(StagedDir(spec.target(name), replace=spec.replace), spec)

    def _chunk(self, path: object, offset: object, data: object) -> None:
        unit = self._unit
        if unit is None:
            raise StreamError("refused a file outside a unit")
        relative = check_relative(path)
        if Path(relative).suffix.lower() not in unit.area.suffixes:
            raise StreamError(f"refused {relative}: not a file type this unit holds")
        if not isinstance(data, bytes) or len(data) > 2 * CHUNK_BYTES:
            raise StreamError(f"refused a chunk of {relative} that is not bytes of at most {2 * CHUNK_BYTES}")
        if type(offset) is not int or offset != unit.sizes.get(relative, 0) or (offset == 0 and relative in unit.sizes):
            raise StreamError(f"refused a chunk of {relative} out of order")
        if relative not in unit.sizes and len(unit.sizes) >= MAX_UNIT_FILES:
            raise StreamError(f"refused a unit of more than {MAX_UNIT_FILES} files")
        unit.total += len(data)
        if unit.total > MAX_UNIT_BYTES:
            raise StreamError(f"refused a unit larger than {MAX_UNIT_BYTES // 1024**3} GiB")
        target = unit.staged.staging / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "ab" if offset else "xb") as handle:
                handle.write(data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            raise StreamError(f"refused {relative}: it clashes with another file of the unit") from None
        unit.sizes[relative] = offset + len(data)

    def _close(self) -> None:
        unit = self._unit
        if unit is None:
            raise StreamError("refused a close outside a unit")
        self._unit = None
        try:
            path = unit.staged.commit()
        finally:
            unit.staged.discard()
        if unit.area.on_commit is not None:
            unit.area.on_commit(path)


def send_folder(area: str, name: str, folder: Path) -> Iterator[tuple]:
    """The events sending `folder` as one unit: its regular files (links are never followed), in chunks read
    as they are needed."""
    yield ("open", area, name)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        with open(path, "rb") as handle:
            offset = 0
            while True:
                data = handle.read(CHUNK_BYTES)
                if data or offset == 0:
                    yield ("file", relative, offset, data)
                offset += len(data)
                if len(data) < CHUNK_BYTES:
                    break
    yield ("close",)


def batches(events: Iterable[tuple], max_bytes: int) -> Iterator[list[tuple]]:
    """`events` in lists carrying about `max_bytes` of file data each (one call's worth)."""
    batch, size = [], 0
    for event in events:
        batch.append(event)
        size += len(event[3]) if event[0] == "file" else 0
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
