"""Shared fixtures: a private data folder for the whole session and tiny adapter packages trained once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything reads it: tiny models, workspaces and jobs all live under this folder.
os.environ["BLOCKSTUDIO_HOME"] = tempfile.mkdtemp(prefix="blockstudio-tests-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory) -> dict[str, Path]:
    """Two B-LoRA packages on tiny-sdxl (cat and coffee), trained for two steps with previews."""
    from pipelines.blora import TrainRequest, train_blora
    from pipelines.models import load_pipeline

    folder = tmp_path_factory.mktemp("packages")
    pipe = load_pipeline("tiny-sdxl")
    out = {}
    for name in ("cat", "coffee"):
        out[name] = train_blora(
            TrainRequest(image=EXAMPLES / f"{name}.jpg", out=folder / name, model="tiny-sdxl", steps=2, rank=4,
                         sample_steps=2),
            pipe=pipe,
        )
        pipe.unload_lora_weights()
    return out
