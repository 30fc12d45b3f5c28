"""Per-browser workspaces: an unguessable id names a private folder for one user's packages, jobs and images.

The id lives in the browser (`gr.BrowserState`), so it survives page reloads and server restarts. Ids are
issued by the server only: 16 random characters and 16 characters of an HMAC of them under a key kept in the
data folder (`workspace-key`, never sent anywhere), so an id a client makes up is refused and cannot open a
workspace of its own (nor get around the per-user job limit). The key the browser stores the id under is a
different one, and public. Every path a request names is resolved inside the workspace folder and refused
otherwise, so knowing the layout of the server does not let one session read another's files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pipelines.errors import BlockStudioError, UnsafeName
from pipelines.storage import home_dir

_ID_RE = re.compile(r"[A-Za-z0-9_-]{32}")
_NONCE_CHARS = 16
_KEYS: dict[str, bytes] = {}
_KEYS_LOCK = threading.Lock()


class WorkspaceError(BlockStudioError):
    """A missing or malformed workspace id, or a path that leaves its workspace."""


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The content of a private file of the data folder, written once (mode 0600) by whoever comes first.

    The file is written whole under a temporary name and linked into place, so a concurrent reader sees it
    complete or not at all, and two servers starting together agree on one content.
    """
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(make())
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first; theirs is the one
        finally:
            os.unlink(tmp)
    text = path.read_text().strip()
    if not text:
        raise WorkspaceError(f"{path.name} in the data folder is empty; delete it and restart the server")
    return text


def _signing_key(home: Path | None) -> bytes:
    folder = Path(home) if home is not None else home_dir()
    cache_key = str(folder.resolve())
    with _KEYS_LOCK:
        if cache_key not in _KEYS:
            text = secret_file(folder / "workspace-key", lambda: secrets.token_hex(32))
            _KEYS[cache_key] = hashlib.sha256(text.encode()).digest()
        return _KEYS[cache_key]


def _tag(nonce: str, home: Path | None) -> str:
    digest = hmac.new(_signing_key(home), nonce.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[: 32 - _NONCE_CHARS]


def new_workspace_id(home: Path | None = None) -> str:
    """A fresh id signed for the data folder `home`: 96 random bits and a 96-bit HMAC tag, 32 URL-safe characters."""
    nonce = secrets.token_urlsafe(12)
    return nonce + _tag(nonce, home)


def is_workspace_id(value: object, home: Path | None = None) -> bool:
    """Whether `value` is an id this server issued (for the data folder `home`).

    Ids from before ids were signed stay valid while their workspace folder exists, so nobody loses their work;
    no new unsigned folder can be made, since every folder is created through an id that passed this check.
    """
    if not workspace_id_like(value):
        return False
    if hmac.compare_digest(value[_NONCE_CHARS:], _tag(value[:_NONCE_CHARS], home)):
        return True
    return (workspaces_root(home) / value).is_dir()


def workspace_id_like(value: object) -> bool:
    """Whether `value` has the form of a workspace id; its signature is not checked (that needs the key)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def workspaces_root(home: Path | None = None) -> Path:
    return (home or home_dir()) / "workspaces"


def inside(root: Path, relative: str | os.PathLike) -> Path:
    """`root / relative`, refusing absolute paths, `..`, and links that lead out of `root`."""
    text = str(relative)
    if not text or "\x00" in text or "\\" in text:
        raise UnsafeName(f"path {text!r} is not allowed")
    pure = PurePosixPath(text)
    if pure.is_absolute() or any(part in ("..", "") for part in pure.parts):
        raise UnsafeName(f"path {text!r} is not allowed: use a name inside your workspace")
    target = root / pure
    resolved_root = root.resolve()
    # resolve() follows symlinks, so a link planted inside the folder cannot point elsewhere.
    if not target.resolve().is_relative_to(resolved_root):
        raise UnsafeName(f"path {text!r} leads outside your workspace")
    return target


class Workspace:
    """One user's folder: `packages/`, `jobs/`, `outputs/`, `exports/` under `<home>/workspaces/<id>`."""

    def __init__(self, workspace_id: str, home: Path | None = None) -> None:
        if not is_workspace_id(workspace_id, home):
            raise WorkspaceError("this page has no valid workspace; reload the page to get one")
        self.id = workspace_id
        self.root = workspaces_root(home) / workspace_id

    def folder(self, name: str) -> Path:
        """A top-level folder of the workspace, created on first use."""
        path = inside(self.root, name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def packages(self) -> Path:
        return self.folder("packages")

    @property
    def jobs(self) -> Path:
        return self.folder("jobs")

    @property
    def outputs(self) -> Path:
        return self.folder("outputs")

    @property
    def exports(self) -> Path:
        return self.folder("exports")

    def path(self, relative: str | os.PathLike) -> Path:
        return inside(self.root, relative)

    def scrub(self, text: str) -> str:
        """A message without server paths: the workspace folder disappears, the data folder becomes `<data>`."""
        root = str(self.root)
        text = text.replace(str(self.root / "packages") + os.sep, "").replace(root + os.sep, "").replace(root, "")
        return scrub_paths(text.replace(str(self.root.parent.parent), "<data>"))


# Any workspace folder in a message, whichever data folder it lies in: it would show the id.
_WORKSPACE_PATH = re.compile(r"[^\s'\"]*/workspaces/[A-Za-z0-9_-]{32}(?:/packages)?(?:/|\b)")


def scrub_paths(text: str) -> str:
    """A message without workspace folders (their ids are secrets) and with the default data folder as `<data>`."""
    return _WORKSPACE_PATH.sub("", text).replace(str(home_dir()), "<data>")
