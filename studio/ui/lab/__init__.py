"""The Adapter lab: one panel per text/vision adapter method, each panel a module of this package.

A panel module defines `TITLE` (the tab label), optionally `ORDER` (smaller first), and `build(studio)`, which
creates the panel's components inside the tab the lab opens for it. Adding a method's panel is adding one
module here; nothing else needs to change. Modules whose name starts with `_` are not panels.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from types import ModuleType

import gradio as gr

log = logging.getLogger(__name__)


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


def build(studio) -> list[str]:
    """One sub-tab per panel; returns the titles shown."""
    titles = []
    with gr.Tabs():
        for panel in discover_panels():
            with gr.Tab(panel.TITLE):
                panel.build(studio)
            titles.append(panel.TITLE)
    return titles
