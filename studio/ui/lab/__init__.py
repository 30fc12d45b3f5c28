"""The Adapter lab: an overview of the adapter methods, and one panel per method that has a lab experiment.

Every experiment registered in `pipelines.lab.EXPERIMENTS` gets the generic panel (`_panel.py`): a form built
from its settings dataclass, Run through the job queue, and its figures and tables. A module of this package
is a bespoke panel: it defines `TITLE` (the tab label), optionally `ORDER` (smaller first) and `METHOD` (the lab
method whose generic panel it replaces), and `build(studio)`, which creates the panel's components inside the
tab the lab opens for it. Modules whose name starts with `_` are not panels.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import gradio as gr

log = logging.getLogger(__name__)
GENERIC_ORDER = 10


def discover_panels() -> list[ModuleType]:
    """Every panel module in this package, ordered by (ORDER, TITLE); a broken one is skipped and logged."""
    panels = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception:
            log.exception("lab panel %s failed to import; it is left out", info.name)
            continue
        if isinstance(getattr(module, "TITLE", None), str) and callable(getattr(module, "build", None)):
            panels.append(module)
    return sorted(panels, key=lambda m: (getattr(m, "ORDER", 100), m.TITLE))


@dataclass(frozen=True)
class Tab:
    """One tab of the lab: a bespoke panel module, or the generic panel of an experiment."""

    title: str
    order: int
    module: ModuleType | None = None
    experiment: Any = None


def lab_tabs() -> list[Tab]:
    """The tabs in order: bespoke panels, and a generic panel for each experiment no bespoke panel replaces."""
    from pipelines.adapters import METHODS
    from pipelines.lab import EXPERIMENTS

    panels = discover_panels()
    replaced = {getattr(p, "METHOD", None) for p in panels}
    tabs = [Tab(p.TITLE, getattr(p, "ORDER", 100), module=p) for p in panels]
    tabs += [Tab(METHODS[method].title, GENERIC_ORDER, experiment=experiment)
             for method, experiment in EXPERIMENTS.items() if method not in replaced]
    return sorted(tabs, key=lambda t: (t.order, t.title.lower()))


def build(studio) -> list[str]:
    """One sub-tab per panel; returns the titles shown."""
    from studio.ui.lab import _panel

    titles = []
    with gr.Tabs():
        for tab in lab_tabs():
            with gr.Tab(tab.title) as page:
                if tab.module is not None:
                    tab.module.build(studio)
                else:
                    _panel.build(studio, tab.experiment, page)
            titles.append(tab.title)
    return titles
