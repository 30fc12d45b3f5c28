"""The adapter library: the packages of one workspace on disk, plus read-only shared examples.

Listing, renaming, deleting, importing (a zipped package or a LoRA `.safetensors`), inspecting and zipping for
download. Every write goes through a staging folder that is renamed into place, so a crash leaves the old
package or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipelines import formats
from pipelines.errors import BlockStudioError, InvalidAdapter
from pipelines.package import AdapterPackage, check_name
from pipelines.rank_export import RANK_ADAPTERS, export_package, trained_file
from pipelines.storage import atomic_dir, atomic_file, home_dir, write_json
from studio.workspace import Workspace, inside

SHARED_PREFIX = "shared:"
PARTIAL_SUFFIX = ".partial"
# What a package folder may hold; anything else in an uploaded zip is refused.
PACKAGE_SUFFIXES = {".safetensors", ".json", ".md", ".png", ".jpg", ".jpeg", ".webp", ".txt"}
MAX_ZIP_ENTRIES = 200
MAX_ZIP_BYTES = 4 * 1024**3
STORED_SUFFIXES = {".safetensors", ".png", ".jpg", ".jpeg", ".webp"}  # already dense: not worth deflating


class LibraryError(BlockStudioError):
    """A library operation the user asked for cannot be done; the message says why."""


@dataclass
class PackageSummary:
    name: str  # the value to refer to it by (shared ones carry the `shared:` prefix)
    title: str
    method: str
    base_model: str
    token: str
    created: str
    thumbnail: Path | None
    shared: bool
    path: Path

    @property
    def caption(self) -> str:
        return f"{self.title} · {self.method} · {self.base_model} · {self.token}"


def tokens_of(info: dict) -> str:
    """The package's trigger tokens: SplitFlux trains a style token beside the content one, B-LoRA one for both."""
    return " ".join(dict.fromkeys(t for t in (info.get("token"), info.get("style_token")) if t)) or "?"


def shared_root() -> Path:
    return Path(os.environ.get("BLOCKSTUDIO_SHARED") or home_dir() / "shared")


def check_package_name(name: str) -> str:
    check_name(name)
    if name.endswith(PARTIAL_SUFFIX):
        raise LibraryError(f"name {name!r} is reserved for unfinished training runs; pick another")
    return name


def slug(text: str, fallback: str = "adapter") -> str:
    """A package name made from free text (a file name): letters, digits, '-' and '_' only."""
    out = "".join(c if c.isalnum() or c in "-_" else "-" for c in text.strip())
    out = "-".join(p for p in out.split("-") if p)[:48].strip("-_")
    return out if out and out[0].isalnum() else fallback


class Library:
    """The packages of one workspace, and the shared read-only ones."""

    def __init__(self, workspace: Workspace, shared: Path | None = None) -> None:
        self.workspace = workspace
        self.shared = shared if shared is not None else shared_root()

    # -- reading ------------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The folder of package `name`, which must exist."""
        if not isinstance(name, str) or not name:
            raise LibraryError("choose a package first")
        if name.startswith(SHARED_PREFIX):
            bare = check_name(name[len(SHARED_PREFIX):])
            folder = inside(self.shared, bare) if self.shared.is_dir() else None
        else:
            folder = inside(self.workspace.packages, check_name(name))
        if folder is None or not (folder / "adapter.json").is_file():
            raise LibraryError(f"there is no package named {name!r} in your library")
        return folder

    def open(self, name: str) -> AdapterPackage:
        return AdapterPackage.open(self.path(name))

    def _summaries(self, root: Path, shared: bool) -> list[PackageSummary]:
        out = []
        if not root.is_dir():
            return out
        for folder in root.iterdir():
            if folder.name.startswith(".") or folder.name.endswith(PARTIAL_SUFFIX) or folder.is_symlink():
                continue
            try:
                package = AdapterPackage.open(folder)
            except BlockStudioError:
                continue
            info = package.info
            # The trained crop is the picture a user recognises; the tiny models' samples are only noise.
            thumbnail = next((p for p in (package.sample("input"), package.sample("full")) if p), None)
            out.append(PackageSummary(
                name=(SHARED_PREFIX if shared else "") + folder.name,
                title=folder.name + (" (shared)" if shared else ""),
                method=info.get("method", "?"),
                base_model=info.get("base_model", "?"),
                token=tokens_of(info),
                created=str(info.get("created", ""))[:19].replace("T", " "),
                thumbnail=thumbnail,
                shared=shared,
                path=folder,
            ))
        return out

    def list(self) -> list[PackageSummary]:
        """Own packages newest first, then the shared ones."""
        own = sorted(self._summaries(self.workspace.packages, False), key=lambda s: s.created, reverse=True)
        return own + sorted(self._summaries(self.shared, True), key=lambda s: s.name)

    def names(self) -> set[str]:
        return {s.name for s in self.list()}

    def inspect(self, name: str) -> dict:
        """adapter.json plus the files of the package with their sizes."""
        folder = self.path(name)
        info = AdapterPackage.open(folder).info
        files = {
            str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
        }
        return {"name": name, "adapter": info, "files": files}

    # -- naming -------------------------------------------------------------------------------------------

    def is_free(self, name: str) -> bool:
        folder = self.workspace.packages
        return not (folder / name).exists() and not (folder / (name + PARTIAL_SUFFIX)).exists()

    def unique_name(self, wanted: str, taken: set[str] = frozenset()) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`, ... whichever is free (also of unfinished runs and `taken`)."""
        base = slug(wanted)
        candidate, n = base, 1
        while not self.is_free(candidate) or candidate in taken:
            n += 1
            candidate = f"{base}-{n}"
        return check_package_name(candidate)

    # -- writing ------------------------------------------------------------------------------------------

    def _own(self, name: str) -> Path:
        if isinstance(name, str) and name.startswith(SHARED_PREFIX):
            raise LibraryError("shared packages are read-only; import a copy to change it")
        return self.path(name)

    def delete(self, name: str) -> None:
        folder = self._own(name)
        # Rename first so a listing never shows a half-deleted package.
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".deleted", dir=folder.parent))
        os.replace(folder, trash / "package")
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, name: str, new_name: str) -> str:
        """Rename a package: its folder, its name in adapter.json and the model card, its kohya files."""
        folder = self._own(name)
        new_name = check_package_name((new_name or "").strip())
        if new_name == folder.name:
            return new_name
        if not self.is_free(new_name):
            raise LibraryError(f"a package named {new_name!r} already exists")
        target = self.workspace.packages / new_name
        info = json.loads((folder / "adapter.json").read_text())
        with atomic_dir(target) as staging:
            _link_tree(folder, staging)
            files = dict(info.get("files", {}))
            for key, rel in list(files.items()):
                if isinstance(rel, str) and rel.startswith("kohya/"):
                    new_rel = "kohya/" + new_name + rel[len("kohya/") + len(folder.name):]
                    os.replace(staging / rel, staging / new_rel)
                    files[key] = new_rel
            info.update(name=new_name, files=files)
            _rewrite(staging / "adapter.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n"))
            from pipelines.model_card import render_model_card

            card = render_model_card(info)
            _rewrite(staging / "README.md", lambda tmp: tmp.write_text(card))
        shutil.rmtree(folder, ignore_errors=True)
        return new_name

    def import_file(self, upload: str | os.PathLike, *, name: str | None = None, model: str = "sdxl",
                    token: str | None = None) -> str:
        """Import a zipped package or a LoRA `.safetensors` file; return the new package's name."""
        upload = Path(upload)
        suffix = upload.suffix.lower()
        wanted = name.strip() if name and name.strip() else upload.stem
        if name and name.strip():
            check_package_name(wanted)
            if not self.is_free(wanted):
                raise LibraryError(f"a package named {wanted!r} already exists")
        else:
            wanted = self.unique_name(wanted)
        if suffix == ".zip":
            return self._import_zip(upload, wanted)
        if suffix == ".safetensors":
            from pipelines.importer import import_lora

            import_lora(upload, self.workspace.packages / wanted, model=model, token=token or None)
            return wanted
        if suffix in formats.PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{upload.name}: pickled checkpoints are not loaded for safety; use .safetensors")
        raise LibraryError(f"{upload.name}: import a package .zip or a LoRA .safetensors file")

    def _import_zip(self, upload: Path, name: str) -> str:
        try:
            archive = zipfile.ZipFile(upload)
        except (zipfile.BadZipFile, OSError):
            raise LibraryError(f"{upload.name}: not a zip file") from None
        with archive, atomic_dir(self.workspace.packages / name) as staging:
            members = _safe_members(archive, upload.name)
            for member, relative in members:
                target = inside(staging, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                _extract_bounded(archive, member, target)
            _check_package_folder(staging, upload.name)
            info_path = staging / "adapter.json"
            info = json.loads(info_path.read_text())
            info["name"] = name
            write_json(info_path, info)
        return name

    def rank_range(self, name: str) -> tuple[int, int, int] | None:
        """(lowest, highest, current) rank package `name` can be exported at, or None for a plain LoRA package."""
        info = self.open(name).info
        adapter = info.get("adapter")
        if not isinstance(adapter, dict) or adapter.get("type") not in RANK_ADAPTERS:
            return None
        if not (self.path(name) / trained_file(adapter["type"])).is_file():
            return None  # an exported copy: it holds only its one rank
        low, high = adapter.get("rank_range") or (None, None)
        current = info.get("rank")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, current)):
            return None
        return low, high, current

    def export_zip(self, name: str, rank: int | float | None = None) -> Path:
        """The whole package as `<name>.zip` (one top folder), written atomically into the workspace.

        With a `rank` other than the package's own (a DyLoRA or SoRA package), the zip holds the package
        exported at that rank as `<name>-r<rank>`: an ordinary package of that size.
        """
        folder = self.path(name)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)
                                 or not math.isfinite(rank) or rank != int(rank)):
            raise LibraryError(f"rank must be a whole number, not {rank!r}")
        if rank is None or rank == 0 or rank == self.open(name).info.get("rank"):
            return self._zip(folder, folder.name)
        bare = f"{folder.name[:56]}-r{int(rank)}"
        staging = Path(tempfile.mkdtemp(prefix=".rank-", dir=self.workspace.exports))
        try:
            export_package(folder, int(rank), staging / bare)
            return self._zip(staging / bare, bare)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _zip(self, folder: Path, bare: str) -> Path:
        target = self.workspace.exports / f"{bare}.zip"
        with atomic_file(target) as tmp:
            with zipfile.ZipFile(tmp, "w") as archive:
                for path in sorted(folder.rglob("*")):
                    if not path.is_file() or any(p.startswith(".") for p in path.relative_to(folder).parts):
                        continue
                    method = zipfile.ZIP_STORED if path.suffix.lower() in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                    archive.write(path, f"{bare}/{path.relative_to(folder).as_posix()}", compress_type=method)
        return target


# -- helpers --------------------------------------------------------------------------------------------


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` under `target` (copy where links are not possible)."""
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def _rewrite(path: Path, write) -> None:
    """Replace a (possibly hard-linked) file by a new one, leaving the other link untouched."""
    with atomic_file(path) as tmp:
        write(tmp)


def _safe_members(archive: zipfile.ZipFile, label: str) -> list[tuple[zipfile.ZipInfo, str]]:
    """The zip's files with their paths inside the package, refusing anything that could escape or explode."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if not infos:
        raise LibraryError(f"{label}: the zip is empty")
    if len(infos) > MAX_ZIP_ENTRIES:
        raise LibraryError(f"{label}: {len(infos)} files is too many for an adapter package")
    if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
        raise LibraryError(f"{label}: the zip unpacks to more than {MAX_ZIP_BYTES // 1024**3} GB")
    paths = []
    for info in infos:
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise LibraryError(f"{label}: links are not allowed in a package ({info.filename})")
        pure = PurePosixPath(info.filename.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or any(p.startswith(".") for p in pure.parts):
            raise LibraryError(f"{label}: unsafe path {info.filename!r} in the zip")
        paths.append(pure)
    # A zip made from a folder has one top folder; the package is what is inside it.
    tops = {p.parts[0] for p in paths}
    strip = len(tops) == 1 and all(len(p.parts) > 1 for p in paths)
    members = []
    for info, pure in zip(infos, paths, strict=True):
        relative = PurePosixPath(*pure.parts[1:]) if strip else pure
        if relative.suffix.lower() in formats.PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{label}: {relative} is a pickled checkpoint, which is not loaded for safety")
        if relative.suffix.lower() not in PACKAGE_SUFFIXES:
            raise LibraryError(f"{label}: {relative} is not a file an adapter package holds")
        members.append((info, relative.as_posix()))
    return members


def _extract_bounded(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> None:
    """Copy one member, trusting the actual bytes rather than the size the zip header declares."""
    limit = member.file_size
    written = 0
    with archive.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise LibraryError(f"{member.filename}: larger than the zip declares")
            dst.write(chunk)


def _check_package_folder(folder: Path, label: str) -> None:
    """An unpacked zip must be a readable package whose weight files are safetensors inside it."""
    try:
        package = AdapterPackage.open(folder)
    except BlockStudioError:
        raise LibraryError(f"{label}: no adapter.json found; export packages from Block Studio as zip") from None
    files = package.info.get("files")
    if not isinstance(files, dict) or "full" not in files:
        raise LibraryError(f"{label}: adapter.json lists no weight files")
    for rel in files.values():
        for item in rel if isinstance(rel, list) else [rel]:
            path = inside(folder, str(item))
            if not path.is_file():
                raise LibraryError(f"{label}: {item} is listed in adapter.json but missing")
            if path.suffix == ".safetensors":
                formats.read_safetensors(path)
