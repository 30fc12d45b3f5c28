"""The Adapter lab shell: a panel is one module, and a module dropped into the package shows up as a tab."""

from __future__ import annotations

import sys

import studio.ui.lab as lab

PANEL = '''
TITLE = "Toy method"
ORDER = 5


def build(studio):
    import gradio as gr

    gr.Markdown("toy panel body")
'''


def test_the_shell_ships_with_its_overview_panel():
    assert [p.TITLE for p in lab.discover_panels()] == ["Overview"]


def test_a_panel_module_dropped_in_appears_in_the_app(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(PANEL)
    (tmp_path / "_helpers.py").write_text("TITLE = 'not a panel'\ndef build(studio): pass\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('a panel that fails to import')\n")
    monkeypatch.setattr(lab, "__path__", [*lab.__path__, str(tmp_path)])
    for name in ("toy_method", "_helpers", "broken"):
        monkeypatch.delitem(sys.modules, f"studio.ui.lab.{name}", raising=False)
    assert [p.TITLE for p in lab.discover_panels()] == ["Overview", "Toy method"]

    from studio.app import build_app
    from studio.jobs import JobManager

    jobs = JobManager(tmp_path / "home", start=False)
    demo = build_app(tmp_path / "home", jobs=jobs, gpu=False)
    labels = [b.label for b in demo.blocks.values() if type(b).__name__ == "Tab"]
    texts = [getattr(b, "value", None) for b in demo.blocks.values() if type(b).__name__ == "Markdown"]
    assert "Toy method" in labels and "toy panel body" in texts
