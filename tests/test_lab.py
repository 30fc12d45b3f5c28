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


BESPOKE = '''
TITLE = "LoRA, by hand"
METHOD = "lora"


def build(studio):
    import gradio as gr

    gr.Markdown("bespoke lora panel")
'''


def test_each_experiment_gets_a_generic_tab_unless_a_bespoke_panel_replaces_it(tmp_path, monkeypatch):
    from pipelines.adapters import METHODS
    from pipelines.lab import EXPERIMENTS

    generic = sorted((METHODS[m].title for m in EXPERIMENTS), key=str.lower)
    assert "LoRA" in generic
    assert [(t.title, t.experiment is not None) for t in lab.lab_tabs()] == [
        ("Overview", False), *[(title, True) for title in generic]]
    (tmp_path / "lora_by_hand.py").write_text(BESPOKE)
    monkeypatch.setattr(lab, "__path__", [*lab.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "studio.ui.lab.lora_by_hand", raising=False)
    others = [(title, True) for title in generic if title != "LoRA"]
    assert [(t.title, t.experiment is not None) for t in lab.lab_tabs()] == [
        ("Overview", False), *others, ("LoRA, by hand", False)]  # generic tabs first, then bespoke panels


def test_the_generic_form_picks_a_control_per_setting_type():
    from dataclasses import dataclass, field

    import gradio as gr

    from pipelines.lab import LabSettings
    from studio.ui.lab._panel import component_for, ordered_fields, settings_of

    @dataclass
    class Form(LabSettings):
        steps: int = field(default=10, metadata={"help": "steps", "label": "Steps", "min": 1, "max": 100})
        rate: float = field(default=0.1, metadata={"help": "rate", "min": 0.0, "max": 1.0})
        sweep: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0, "widget": "slider"})
        merge: bool = field(default=True, metadata={"help": "merge"})
        task: str = field(default="copy", metadata={"choices": ["copy", "sort"]})
        ranks: tuple[int, ...] = field(default=(1, 2), metadata={"choices": [1, 2, 4]})
        scales: tuple[float, ...] = field(default=(0.5, 1.0))

    with gr.Blocks():
        controls = {spec.name: component_for(spec) for spec in ordered_fields(Form)}
    kinds = {name: type(c).__name__ for name, c in controls.items()}
    assert kinds == {"steps": "Slider", "rate": "Number", "sweep": "Slider", "merge": "Checkbox",
                     "task": "Dropdown", "ranks": "Dropdown", "scales": "Textbox", "seed": "Number",
                     "model_id": "Textbox"}
    assert list(controls) == ["steps", "rate", "sweep", "merge", "task", "ranks", "scales", "seed", "model_id"]
    assert controls["ranks"].multiselect and controls["scales"].value == "0.5, 1.0"
    assert controls["steps"].label == "Steps" and controls["steps"].info == "steps"
    assert settings_of(Form, tuple(range(9)))["model_id"] == 8


def test_a_panel_whose_method_is_unavailable_says_why_and_cannot_run(tmp_path, monkeypatch):
    import dataclasses

    import gradio as gr

    from pipelines.adapters import METHODS
    from pipelines.lab import EXPERIMENTS
    from studio.ui.common import Studio
    from studio.ui.lab import _panel
    from studio.ui.lab.overview import method_status

    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(METHODS["lora"], requires=("no_such_package_here",)))
    assert method_status("lora") == ("unavailable: LoRA needs the no_such_package_here package "
                                     "(pip install no_such_package_here)")
    with gr.Blocks():
        studio = Studio(home=tmp_path, jobs=None, generation=None, gpu=False, default_models={},
                        workspace=gr.BrowserState(None))
        panel = _panel.build(studio, EXPERIMENTS["lora"])
        notes = [b.value for b in gr.context.Context.root_block.blocks.values() if type(b).__name__ == "Markdown"]
    assert panel.run.interactive is False
    assert any("Unavailable here:** LoRA needs the no_such_package_here package" in str(n) for n in notes)
