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
from pipelines.models import REGISTRY
from pipelines.package import AdapterPackage
from studio.gpu import on_zero_gpu
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
        return ("zero", "**ZeroGPU.** Mixing and re-embedding get a GPU per request. Training runs for many "
                "minutes and needs dedicated GPU hardware; on ZeroGPU, import adapters trained elsewhere.")
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


def upload_path(value: Any) -> str | None:
    """The server path of an upload given to a handler registered with `preprocess=False`.

    Gradio's own image decoding fails with a generic error on a broken file; taking the raw upload lets
    `pipelines.images.load_image` check it and say what is wrong.
    """
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def format_size(size: float) -> str:
    """A file size a person reads at a glance: 812 B, 3.4 kB, 171.3 MB, 1.2 GB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "–"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
