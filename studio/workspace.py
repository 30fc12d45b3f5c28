"""Per-browser workspaces: an unguessable id names a private folder for one user's packages, jobs and images.

The id lives in the browser (`gr.BrowserState`), so it survives page reloads and server restarts. Every path a
request names is resolved inside the workspace folder and refused otherwise, so knowing the layout of the
server does not let one session read another's files.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path, PurePosixPath

from pipelines.errors import BlockStudioError, UnsafeName
from pipelines.storage import home_dir

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")


class WorkspaceError(BlockStudioError):
    """A missing or malformed workspace id, or a path that leaves its workspace."""


def new_workspace_id() -> str:
    """192 random bits, URL-safe: 32 characters nobody can guess."""
    return secrets.token_urlsafe(24)


def is_workspace_id(value: object) -> bool:
    return isinstance(value, str) and bool(_ID_RE.match(value))


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
        if not is_workspace_id(workspace_id):
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
        return text.replace(str(self.root.parent.parent), "<data>")
