"""What every tab shares: the studio's services, the workspace of a request, and errors shown as messages.

Handlers are wrapped by `handler`, which turns any exception into a one-line `gr.Error` in the page (with
server paths removed) that says what went wrong and what to do; unexpected ones are logged with their
traceback on the server only. `upload_path` admits only files the server received as uploads.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.errors import BlockStudioError, explain
from pipelines.package import AdapterPackage
from studio.jobs import JobManager
from studio.library import Library, PackageSummary
from studio.mixing import GenerationService
from studio.workspace import Workspace, scrub_paths

log = logging.getLogger("studio.ui")


@dataclass
class Studio:
    """The process-wide services and settings the tabs are built with."""

    home: Path
    jobs: JobManager
    generation: GenerationService
    gpu: bool
    default_models: dict[str, str]  # arch -> model name
    hub_endpoint: str | None = None
    workspace: Any = None  # the gr.BrowserState holding the workspace id, set by build_app
    package_pickers: list[tuple[gr.Dropdown, str | None]] = field(default_factory=list)

    def workspace_of(self, workspace_id: str | None) -> Workspace:
        return Workspace(workspace_id or "", self.home)

    def library(self, workspace_id: str | None) -> Library:
        return Library(self.workspace_of(workspace_id))

    def package_picker(self, label: str, part: str | None, **kwargs: Any) -> gr.Dropdown:
        """A dropdown of the workspace's packages (those that have `part`), kept fresh by the app."""
        dropdown = gr.Dropdown(label=label, choices=[], value=None, allow_custom_value=True, **kwargs)
        self.package_pickers.append((dropdown, part))
        return dropdown


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def handler(fn: Callable) -> Callable:
    """Run an event handler; any failure reaches the page as one line, never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (BlockStudioError, ValueError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise gr.Error(one_line(_scrub(message, args)), print_exception=False) from None
        except Exception as exc:
            explained = explain(exc)
            if explained is None:
                log.exception("%s failed", fn.__name__)
                explained = (f"Something went wrong on the server ({type(exc).__name__}); try again, and if it "
                             "keeps failing tell the admin (the details are in the server log).")
            else:
                log.warning("%s failed: %s", fn.__name__, exc)
            raise gr.Error(one_line(_scrub(explained, args)), print_exception=False) from None

    return wrapper


def _scrub(message: str, args: tuple) -> str:
    """Remove workspace folders (whose names are the ids) and the data folder from a message."""
    return scrub_paths(message)


def package_choices(studio: Studio, workspace_id: str | None, part: str | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for a package dropdown; empty when the page has no workspace yet."""
    try:
        summaries = studio.library(workspace_id).list()
    except BlockStudioError:
        return []
    out = []
    for s in summaries:
        if part is not None and not _has_part(s, part):
            continue
        out.append((f"{s.title} · {s.token} · {s.base_model}", s.name))
    return out


def _has_part(summary: PackageSummary, part: str) -> bool:
    try:
        return AdapterPackage.open(summary.path).has(part)
    except BlockStudioError:
        return False


EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
NOT_AN_UPLOAD = "that file did not come from an upload on this page; upload it again"


class UploadRefused(BlockStudioError):
    """A request names a file the server did not receive as an upload."""


def upload_path(value: Any) -> str | None:
    """The server path of an upload given to a handler registered with `preprocess=False`, checked.

    Gradio's own image decoding fails with a generic error on a broken file; taking the raw upload lets
    `pipelines.images.load_image` check it and say what is wrong. A raw value is whatever the client sent, so
    its path is accepted only through `checked_upload`.
    """
    if value is None or value == "":
        return None
    path = value.get("path") if isinstance(value, dict) else value
    return checked_upload(path)


def checked_upload(path: Any) -> str:
    """`path` if it is a file the server received as an upload (or a shipped example), else `UploadRefused`.

    Uploads and the examples shown in the page live in Gradio's upload cache, under folders named by a hash of
    their content with a per-server secret seed, so a path there can only be named by whoever received it.
    Anything else (another file of the server, a link out of the cache) is refused with the same line whether
    it exists or not, so a request cannot even learn which paths exist.
    """
    from gradio.utils import get_upload_folder

    if not isinstance(path, str) or not path or "\x00" in path:
        raise UploadRefused(NOT_AN_UPLOAD)
    resolved = Path(os.path.realpath(path))
    allowed = resolved.is_relative_to(Path(os.path.realpath(get_upload_folder()))) or (
        resolved.parent == EXAMPLES and resolved.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    try:
        regular = allowed and stat.S_ISREG(os.stat(resolved).st_mode)
    except OSError:
        regular = False
    if not regular:
        raise UploadRefused(NOT_AN_UPLOAD)
    return str(resolved)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
