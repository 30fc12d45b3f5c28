"""What every tab shares: the studio's services, the workspace of a request, and errors shown as messages.

Handlers are wrapped by `handler`, which turns any exception into a one-line `gr.Error` in the page (with
server paths removed); unexpected ones are logged with their traceback on the server only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.errors import BlockStudioError
from pipelines.package import AdapterPackage
from studio.jobs import JobManager
from studio.library import Library, PackageSummary
from studio.mixing import GenerationService
from studio.workspace import Workspace

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
        except (BlockStudioError, ValueError, KeyError, FileNotFoundError, PermissionError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise gr.Error(one_line(_scrub(message, args)), print_exception=False) from None
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            raise gr.Error(
                one_line(f"Something went wrong ({type(exc).__name__}); the details are in the server log."),
                print_exception=False,
            ) from None

    return wrapper


def _scrub(message: str, args: tuple) -> str:
    """Remove the workspace's server path from a message when the first argument names a workspace."""
    workspace_id = args[0] if args and isinstance(args[0], str) else None
    try:
        return Workspace(workspace_id or "").scrub(message) if workspace_id else message
    except BlockStudioError:
        return message


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


def upload_path(value: Any) -> str | None:
    """The server path of an upload given to a handler registered with `preprocess=False`.

    Gradio's own image decoding fails with a generic error on a broken file; taking the raw upload lets
    `pipelines.images.load_image` check it and say what is wrong.
    """
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
