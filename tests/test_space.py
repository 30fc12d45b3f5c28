"""Running as a Hugging Face Space: front matter, requirements, the ZeroGPU decorator, the CPU banner."""

from __future__ import annotations

import re
import sys
import types

import gradio as gr
import pytest
import yaml

from studio.gpu import gpu
from tests.conftest import ROOT


def _front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1])


def test_readme_front_matter_configures_a_gradio_space():
    meta = _front_matter()
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert str(meta["sdk_version"]).split(".")[0] == gr.__version__.split(".")[0]
    assert re.fullmatch(r"3\.\d+", str(meta["python_version"]))
    assert (ROOT / "README.md").read_text().split("---", 2)[2].lstrip().startswith("# Block Studio\n\n```bash\nmake app")


def test_requirements_list_every_project_dependency_but_gradio():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project} - {"gradio"}
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = {re.split(r"[<>=\[ ]", line)[0].lower() for line in lines if line and not line.startswith("#")}
    assert listed == wanted


def test_gpu_decorator_is_a_no_op_without_spaces_and_applies_spaces_gpu_with_it(monkeypatch):
    def make(x):
        return x + 1

    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    monkeypatch.setattr("builtins.__import__", _import_without("spaces"))
    assert gpu(make) is make
    monkeypatch.undo()

    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn=None, duration=None: (calls.append(duration), (lambda f: f) if fn is None else fn)[1]
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu(make)(1) == 2 and gpu(duration=120)(make)(1) == 2
    assert calls == [None, 120]


def _import_without(name):
    real = __import__

    def fake_import(module, *args, **kwargs):
        if module == name:
            raise ImportError(module)
        return real(module, *args, **kwargs)

    return fake_import


def test_without_a_gpu_the_page_says_the_tiny_models_are_for_trying_the_workflow(tmp_path):
    from studio.app import build_app
    from studio.jobs import JobManager

    cpu = build_app(tmp_path, jobs=JobManager(tmp_path, start=False), gpu=False)
    texts = " ".join(str(getattr(b, "value", "")) for b in cpu.blocks.values())
    assert "tiny random-weight models" in texts and "not pictures" in texts
    assert cpu.studio.default_models["sdxl"] == "tiny-sdxl"

    gpu_app = build_app(tmp_path, jobs=JobManager(tmp_path, start=False), gpu=True)
    texts = " ".join(str(getattr(b, "value", "")) for b in gpu_app.blocks.values())
    assert "tiny random-weight models" not in texts
    assert gpu_app.studio.default_models["sdxl"] == "sdxl"
