"""What every tab shares: the studio's services, the workspace of a request, and errors shown as messages.

Handlers are wrapped by `handler`, which turns any exception into a one-line `gr.Error` in the page (with
server paths removed) that says what went wrong and what to do; unexpected ones are logged with their
traceback on the server only. `upload_path` admits only files the server received as uploads.
"""

from __future__ import annotations

import functools
import html
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.errors import BlockStudioError, explain
from pipelines.models import REGISTRY
from pipelines.package import AdapterPackage
from studio.gpu import on_zero_gpu
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
    banner: Any = None  # the notice at the top of the page (without a GPU or on ZeroGPU), set by build_app
    package_pickers: list[PackagePicker] = field(default_factory=list)

    def workspace_of(self, workspace_id: str | None) -> Workspace:
        return Workspace(workspace_id or "", self.home)

    def library(self, workspace_id: str | None) -> Library:
        return Library(self.workspace_of(workspace_id))

    def package_picker(self, label: str, part: str | None, *, generates: bool = False,
                       partner: gr.Dropdown | None = None, **kwargs: Any) -> gr.Dropdown:
        """A dropdown of the workspace's packages, kept fresh by the app (see `PackagePicker`)."""
        dropdown = gr.Dropdown(label=label, choices=[], value=None, allow_custom_value=True, **kwargs)
        self.package_pickers.append(PackagePicker(dropdown, part, generates, partner))
        return dropdown

    def offers(self, model: str | None) -> bool:
        """Whether this studio trains and generates with `model`: registry models, only tiny ones without a GPU."""
        spec = REGISTRY.get(model or "")
        return spec is not None and (self.gpu or spec.tiny)


@dataclass
class PackagePicker:
    """What a package dropdown offers: packages with `part`; with `generates`, only those on a base model this
    studio runs; with a `partner` dropdown, only those on the base model of the package chosen there (a mix
    needs one base model)."""

    dropdown: gr.Dropdown
    part: str | None
    generates: bool = False
    partner: gr.Dropdown | None = None


def banner(gpu: bool, model: str | None = None) -> tuple[str, str] | None:
    """(kind, text) of the notice at the top of the page; `model` is the tiny model the chosen method uses."""
    if not gpu:
        return ("cpu", f"**No GPU here, so the studio runs on tiny random-weight models** (`{model or 'tiny-sdxl'}`). "
                "They make noise, not pictures: they are for trying the whole workflow (train, mix, re-embed, "
                "export, share) in seconds. Run Block Studio on a GPU for SDXL and Flux.")
    if on_zero_gpu():
        return ("zero", "**ZeroGPU.** Mixing and re-embedding get a GPU per request. Training runs in chunks of "
                "steps, each a short GPU call that resumes where the last one stopped; other people's jobs run "
                "between the chunks, so a job takes longer here than on dedicated GPU hardware.")
    return None


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


def _offered(studio: Studio, workspace_id: str | None, part: str | None, generates: bool,
             base_model: str | None) -> list[PackageSummary]:
    """The workspace's packages a dropdown offers (see `PackagePicker`); none when the page has no workspace."""
    try:
        summaries = studio.library(workspace_id).list()
    except BlockStudioError:
        return []
    return [s for s in summaries
            if (part is None or _has_part(s, part)) and (not generates or studio.offers(s.base_model))
            and (base_model is None or s.base_model == base_model)]


def picker_updates(studio: Studio, workspace_id: str | None, selected: list[str | None]) -> list[gr.Dropdown]:
    """Fresh choices and a value for every package dropdown, given what each shows now (in registration order).

    A choice still offered stays. Otherwise a dropdown takes the newest package; a mix's content dropdown
    prefers the newest package that another package can be mixed with, and its style dropdown prefers another
    package than the content one, so a fresh page does not mix a package with itself when it need not.
    """
    chosen: dict[int, str | None] = {}
    bases: dict[int, str | None] = {}
    partnered = {id(p.partner) for p in studio.package_pickers if p.partner is not None}
    updates = []
    for picker, current in zip(studio.package_pickers, selected, strict=True):
        partner = id(picker.partner) if picker.partner is not None else None
        base = bases.get(partner) if partner is not None else None
        offered = _offered(studio, workspace_id, picker.part, picker.generates, base)
        names = [s.name for s in offered]
        if current in names:
            value = current
        elif partner is not None:
            value = next((n for n in names if n != chosen.get(partner)), names[0] if names else None)
        elif id(picker.dropdown) in partnered:
            base_count: dict[str, int] = {}
            for s in offered:
                base_count[s.base_model] = base_count.get(s.base_model, 0) + 1
            value = next((s.name for s in offered if base_count[s.base_model] > 1), names[0] if names else None)
        else:
            value = names[0] if names else None
        chosen[id(picker.dropdown)] = value
        bases[id(picker.dropdown)] = next((s.base_model for s in offered if s.name == value), None)
        choices = [(f"{s.title} · {s.token} · {s.base_model}", s.name) for s in offered]
        updates.append(gr.Dropdown(choices=choices, value=value))
    return updates


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


def format_size(size: float) -> str:
    """A file size a person reads at a glance: 812 B, 3.4 kB, 171.3 MB, 1.2 GB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


STATUS_LABELS = {
    "queued": "Queued", "running": "Running", "cancelling": "Stopping", "cancelled": "Cancelled",
    "failed": "Failed", "done": "Done", "interrupted": "Interrupted", "discarded": "Discarded",
}


def queue_note(ahead: int | None) -> str:
    """Where a queued job stands."""
    return "Next in line." if not ahead else f"Waiting: {ahead} job{'s' if ahead > 1 else ''} ahead of yours."


def job_card(status: str, badge: str, title: str, subtitle: str, percent: float, stats: list[str],
             note: str | None, facts: str | None) -> str:
    """A job's card as the Train tab and the lab panels show it: a badge, a title, a progress bar, a row of
    stats, a note and the ops line. `title` and `subtitle` are plain text (escaped here); `stats` and `note` are
    HTML."""
    percent = min(100.0, max(0.0, percent))
    stat_spans = "".join(f"<span>{item}</span>" for item in stats)
    lines = [
        f"<div class='bs-job bs-{html.escape(status)}'>",
        f"<div class='bs-job-head'><span class='bs-badge'>{html.escape(badge)}</span>"
        f"<b>{html.escape(title)}</b><span class='bs-dim'>{html.escape(subtitle)}</span></div>",
        f"<div class='bs-bar' role='progressbar' aria-valuenow='{percent:.0f}' aria-valuemin='0' "
        f"aria-valuemax='100'><div style='width:{percent:.1f}%'></div></div>",
        f"<div class='bs-stats'>{stat_spans}</div>",
    ]
    if note:
        lines.append(f"<div class='bs-note'>{note}</div>")
    lines.append(ops_note(facts))
    lines.append("</div>")
    return "".join(lines)


def ops_note(facts: str | None) -> str:
    """The line under a job's card that says what serves the jobs and how busy it is (`JobFacts.summary`)."""
    return f"<div class='bs-ops bs-dim'>{html.escape(facts)}</div>" if facts else ""


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
