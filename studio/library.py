"""The adapter library: the packages of one workspace on disk, plus read-only shared examples.

Listing, renaming, deleting, importing (a zipped package or a LoRA `.safetensors`), inspecting and zipping for
download. Every write goes through a staging folder that is renamed into place, so a crash leaves the old
package or the new one, never half of one, and never replaces a package that is there: a name is claimed
(`NameClaims`) from the moment a training job or an import takes it until its package exists. Links inside a
package are never followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipelines import formats
from pipelines.checks import check_weights
from pipelines.errors import BlockStudioError, InvalidAdapter
from pipelines.package import AdapterPackage, check_name, package_files
from pipelines.rank_export import RANK_ADAPTERS, export_package, trained_file
from pipelines.storage import atomic_dir, atomic_file, home_dir, write_json
from studio.workspace import Workspace, inside

SHARED_PREFIX = "shared:"
PARTIAL_SUFFIX = ".partial"
# What a package folder may hold; anything else in an uploaded zip is refused.
PACKAGE_SUFFIXES = {".safetensors", ".json", ".md", ".png", ".jpg", ".jpeg", ".webp", ".txt"}
MAX_ZIP_ENTRIES = 200
# What a package zip may expand to. A rank-64 SDXL B-LoRA package is about 0.46 GB (diffusers and kohya files,
# full and per part, fp32) and a rank-128 one, the largest the Train form offers, about 0.9 GB; its weights
# are stored in the zip uncompressed, so with the default 1 GB upload limit no real package expands past 2 GiB.
MAX_PACKAGE_BYTES = 2 * 1024**3
# How much a zip member may expand. Weights and images hardly compress (a ratio near 1; a kohya Flux file's
# zero blocks a few times), text a few times; deflate bombs reach about 1000.
MAX_COMPRESSION_RATIO = 50
RATIO_FREE_BYTES = 1024**2  # smaller members may compress as well as they like (they cannot add up to much)
STORED_SUFFIXES = {".safetensors", ".png", ".jpg", ".jpeg", ".webp"}  # already dense: not worth deflating


class LibraryError(BlockStudioError):
    """A library operation the user asked for cannot be done; the message says why."""


class NameClaims:
    """Package names taken before their package exists: by a training job (queued, running or stopped) or an
    import or a rename in progress. Process-wide, one table per packages folder, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, str]] = {}

    def _table(self, folder: Path) -> dict[str, str]:
        return self._held.setdefault(str(folder.resolve()), {})

    def holder(self, folder: Path, name: str) -> str | None:
        with self._lock:
            return self._table(folder).get(name)

    def claim(self, folder: Path, names: Iterable[str], holder: str, *, on_disk: bool = True) -> str | None:
        """Claim the first of `names` that is free (on disk too, unless `on_disk` is False); None if none is."""
        with self._lock:
            table = self._table(folder)
            for name in names:
                if table.get(name, holder) != holder:
                    continue
                if on_disk and not _free_on_disk(folder, name) and table.get(name) != holder:
                    continue
                table[name] = holder
                return name
        return None

    def release(self, folder: Path, name: str, holder: str) -> None:
        with self._lock:
            key = str(folder.resolve())
            table = self._held.get(key, {})
            if table.get(name) == holder:
                del table[name]
            if not table:
                self._held.pop(key, None)


CLAIMS = NameClaims()


def _free_on_disk(folder: Path, name: str) -> bool:
    return not any(os.path.lexists(folder / n) for n in (name, name + PARTIAL_SUFFIX))


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
    """The package's trigger tokens: its token, and the style token of a recipe that trains one of its own."""
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
        """adapter.json plus the files of the package with their sizes (links are not listed)."""
        folder = self.path(name)
        info = AdapterPackage.open(folder).info
        files = {path.relative_to(folder).as_posix(): path.lstat().st_size for path in package_files(folder)}
        return {"name": name, "adapter": info, "files": files}

    # -- naming -------------------------------------------------------------------------------------------

    def is_free(self, name: str) -> bool:
        """No package, unfinished run or claim has this name."""
        folder = self.workspace.packages
        return _free_on_disk(folder, name) and CLAIMS.holder(folder, name) is None

    def unique_name(self, wanted: str, taken: set[str] = frozenset()) -> str:
        """`wanted`, or `wanted-2`, `wanted-3`, ... whichever is free (also of unfinished runs and `taken`)."""
        for candidate in _candidates(wanted):
            if self.is_free(candidate) and candidate not in taken:
                return check_package_name(candidate)
        raise LibraryError(f"no free name like {wanted!r}; give the package a name")

    def claim(self, name: str | None, holder: str, *, fallback: str = "adapter") -> str:
        """Take `name` (refused when it is taken), or with no name the first free one made from `fallback`.

        The name stays reserved for `holder` until `release`: nothing else can import, rename or train into it.
        """
        folder = self.workspace.packages
        if name:
            check_package_name(name)
            if CLAIMS.claim(folder, [name], holder) is None:
                raise LibraryError(f"a package or job named {name!r} already exists; choose another name")
            return name
        claimed = CLAIMS.claim(folder, (check_package_name(c) for c in _candidates(fallback)), holder)
        if claimed is None:
            raise LibraryError(f"no free name like {fallback!r}; give the package a name")
        return claimed

    def release(self, name: str, holder: str) -> None:
        CLAIMS.release(self.workspace.packages, name, holder)

    @contextlib.contextmanager
    def claimed(self, name: str | None, *, fallback: str = "adapter") -> Iterator[str]:
        """A name held while a package is written under it, released afterwards (the folder then holds it)."""
        holder = f"write:{secrets.token_hex(8)}"
        taken = self.claim(name, holder, fallback=fallback)
        try:
            yield taken
        finally:
            self.release(taken, holder)

    def target(self, name: str) -> Path:
        """The folder a package called `name` is written to: always one level inside the packages folder."""
        return inside(self.workspace.packages, check_package_name(name))

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
        with self.claimed(new_name) as new_name:
            self._rename_into(folder, new_name)
        return new_name

    def _rename_into(self, folder: Path, new_name: str) -> None:
        target = self.target(new_name)
        info = AdapterPackage.open(folder).meta
        with atomic_dir(target, replace=False) as staging:
            _link_tree(folder, staging)
            files = dict(info.files)
            for key, rel in list(files.items()):
                if isinstance(rel, str) and rel.startswith("kohya/"):
                    new_rel = "kohya/" + new_name + rel[len("kohya/") + len(folder.name):]
                    os.replace(staging / rel, staging / new_rel)
                    files[key] = new_rel
            info = dataclasses.replace(info, name=new_name, files=files)
            text = json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n"
            _rewrite(staging / "adapter.json", lambda tmp: tmp.write_text(text))
            from pipelines.model_card import render_model_card

            card = render_model_card(info)
            _rewrite(staging / "README.md", lambda tmp: tmp.write_text(card))
        shutil.rmtree(folder, ignore_errors=True)

    def import_file(self, upload: str | os.PathLike, *, name: str | None = None, model: str | None = None,
                    token: str | None = None, method: str | None = None) -> str:
        """Import a zipped package or a LoRA `.safetensors` file; return the new package's name.

        A LoRA file becomes a package of `method` (a recipe that imports; None: the first) on `model` (None: the
        recipe's default model)."""
        upload = Path(upload)
        suffix = upload.suffix.lower()
        if suffix in formats.PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{upload.name}: pickled checkpoints are not loaded for safety; use .safetensors")
        if suffix not in (".zip", ".safetensors"):
            raise LibraryError(f"{upload.name}: import a package .zip or a LoRA .safetensors file")
        wanted = name.strip() if name and name.strip() else None
        with self.claimed(wanted, fallback=slug(upload.stem)) as wanted:
            if suffix == ".zip":
                return self._import_zip(upload, wanted)
            from pipelines.importer import import_lora

            import_lora(upload, self.target(wanted), model=model or None, token=token or None, method=method or None)
            return wanted

    def _import_zip(self, upload: Path, name: str) -> str:
        try:
            archive = zipfile.ZipFile(upload)
        except (zipfile.BadZipFile, OSError):
            raise LibraryError(f"{upload.name}: not a zip file") from None
        with archive:
            members = _safe_members(archive, upload.name, upload.stat().st_size)
            with atomic_dir(self.target(name), replace=False) as staging:
                for member, relative in members:
                    target = inside(staging, relative)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _extract_bounded(archive, member, target, upload.name)
                self._finish_zip_import(staging, upload.name, name)
        return name

    def _finish_zip_import(self, staging: Path, label: str, name: str) -> None:
        _check_package_folder(staging, label)
        info = AdapterPackage.open(staging).meta
        info.name = name
        write_json(staging / "adapter.json", info.to_dict())

    def merge_styles(self, names: list[str], new_name: str | None, options) -> str:
        """Merge the style parts of packages `names` into a new package of this workspace; return its name."""
        from pipelines.merge import merge_packages

        packages = [self.open(n) for n in dict.fromkeys(n for n in names if n)]
        with self.claimed(new_name or None, fallback="merged-style") as name:
            merge_packages(packages, self.target(name), name, options)
        return name

    def sign(self, name: str, signature: str, key: str = "", new_name: str | None = None) -> str:
        """A signed copy of package `name` (its signature swapped, if it has one); return the copy's name."""
        from pipelines.watermark import mark_package

        folder = self.path(name)
        with self.claimed(new_name or None, fallback=f"{folder.name}-signed") as taken:
            mark_package(folder, signature, key=key, out=self.target(taken))
        return taken

    def verify(self, name: str, key: str = ""):
        from pipelines.watermark import verify_package

        return verify_package(self.path(name), key=key)

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
        with self.at_rank(name, rank) as folder:
            return self._zip(folder, folder.name)

    @contextlib.contextmanager
    def at_rank(self, name: str, rank: int | float | None = None) -> Iterator[Path]:
        """The package's folder, or with a `rank` other than its own (a DyLoRA or SoRA package) a staged export at
        that rank named `<name>-r<rank>`, removed again afterwards: what a download or a Hub push sends."""
        folder = self.path(name)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)
                                 or not math.isfinite(rank) or rank != int(rank)):
            raise LibraryError(f"rank must be a whole number, not {rank!r}")
        if rank is None or rank == 0 or rank == self.open(name).info.get("rank"):
            yield folder
            return
        bare = f"{folder.name[:56]}-r{int(rank)}"
        staging = Path(tempfile.mkdtemp(prefix=".rank-", dir=self.workspace.exports))
        try:
            export_package(folder, int(rank), staging / bare)
            yield staging / bare
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _zip(self, folder: Path, bare: str) -> Path:
        target = self.workspace.exports / f"{bare}.zip"
        with atomic_file(target) as tmp:
            with zipfile.ZipFile(tmp, "w") as archive:
                for path in package_files(folder):
                    method = zipfile.ZIP_STORED if path.suffix.lower() in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                    archive.write(path, f"{bare}/{path.relative_to(folder).as_posix()}", compress_type=method)
        return target


# -- helpers --------------------------------------------------------------------------------------------


def _candidates(wanted: str) -> Iterator[str]:
    """`wanted` as a name, then `wanted-2`, `wanted-3`, ..."""
    base = slug(wanted)
    yield base
    for n in range(2, 10_000):
        yield f"{base}-{n}"


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every regular file of `source` under `target` (copy where links are not possible); symbolic
    links are left out, never followed."""
    for path in package_files(source, hidden=True):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest, follow_symlinks=False)
        except OSError:
            shutil.copy2(path, dest, follow_symlinks=False)


def _rewrite(path: Path, write) -> None:
    """Replace a (possibly hard-linked) file by a new one, leaving the other link untouched."""
    with atomic_file(path) as tmp:
        write(tmp)


def _safe_members(archive: zipfile.ZipFile, label: str, zip_bytes: int) -> list[tuple[zipfile.ZipInfo, str]]:
    """The zip's files with their paths inside the package, refusing anything that could escape or explode.

    Sizes are checked from the zip's directory before a byte is extracted; `_extract_bounded` then holds each
    member to the size it declared.
    """
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if not infos:
        raise LibraryError(f"{label}: the zip is empty")
    if len(infos) > MAX_ZIP_ENTRIES:
        raise LibraryError(f"{label}: {len(infos)} files is too many for an adapter package")
    expanded = sum(i.file_size for i in infos)
    if expanded > MAX_PACKAGE_BYTES:
        raise LibraryError(f"{label}: the zip unpacks to {expanded / 1e9:.1f} GB, more than an adapter package "
                           f"needs (at most {MAX_PACKAGE_BYTES / 1e9:.1f} GB)")
    for info in infos:
        if info.file_size > RATIO_FREE_BYTES and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
            raise LibraryError(f"{label}: {info.filename} would expand {info.file_size / max(info.compress_size, 1):.0f} "
                               "times; that is a zip bomb, not an adapter package")
    if expanded > MAX_COMPRESSION_RATIO * zip_bytes + RATIO_FREE_BYTES:
        raise LibraryError(f"{label}: the zip would expand {expanded / max(zip_bytes, 1):.0f} times; that is a zip "
                           "bomb, not an adapter package")
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


def _extract_bounded(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, label: str) -> None:
    """Copy one member, trusting the actual bytes rather than the size the zip header declares."""
    limit = member.file_size
    written = 0
    try:
        with archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise LibraryError(f"{label}: {member.filename} is larger than the zip declares")
                dst.write(chunk)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise LibraryError(f"{label}: {member.filename} is damaged in the zip ({exc}); make the zip again") from None


def _check_package_folder(folder: Path, label: str) -> None:
    """An unpacked zip must be a readable package whose weight files are safetensors inside it."""
    try:
        package = AdapterPackage.open(folder)
    except BlockStudioError as exc:
        # A record Block Studio cannot read says why (a newer format, a wrong value); anything else is no package.
        reason = str(exc) if str(exc).startswith("adapter.json") else \
            "no adapter.json found; export packages from Block Studio as zip"
        raise LibraryError(f"{label}: {reason}") from None
    files = package.info.get("files")
    if not isinstance(files, dict) or "full" not in files:
        raise LibraryError(f"{label}: adapter.json lists no weight files")
    for rel in files.values():
        for item in rel if isinstance(rel, list) else [rel]:
            path = inside(folder, str(item))
            if not path.is_file():
                raise LibraryError(f"{label}: {item} is listed in adapter.json but missing")
            if path.suffix == ".safetensors":
                tensors, _ = formats.read_safetensors(path)
                check_weights(tensors, f"{label}: {item}")
