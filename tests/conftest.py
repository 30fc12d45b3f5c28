"""Shared fixtures: an isolated Block Studio home, tiny models built once, and one trained package."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"

# Tiny models gain nothing from several threads, and OpenMP threads that spin while another process holds
# the cores slow a step by orders of magnitude; one thread keeps timings steady on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session", autouse=True)
def blockstudio_home(tmp_path_factory) -> Path:
    """A fresh BLOCKSTUDIO_HOME per session; tiny models are copied in from a shared build cache."""
    home = tmp_path_factory.mktemp("home")
    cache = os.environ.get("BLOCKSTUDIO_TEST_MODEL_CACHE")
    if cache and Path(cache, "models").is_dir():
        shutil.copytree(Path(cache, "models"), home / "models")
    os.environ["BLOCKSTUDIO_HOME"] = str(home)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    return home


@pytest.fixture(scope="session")
def tiny_sdxl_path(blockstudio_home) -> Path:
    from pipelines.models import model_path

    return model_path("tiny-sdxl")


@pytest.fixture()
def tiny_sdxl_pipe(tiny_sdxl_path):
    """A freshly loaded tiny SDXL pipeline (function scope: tests add adapters to it)."""
    from pipelines.models import load_pipeline

    return load_pipeline("tiny-sdxl")


def train_tiny(out: Path, image: str = "cat.jpg", steps: int = 30, **overrides) -> Path:
    """Train a small B-LoRA on tiny-sdxl (rank 4, high learning rate, few sample steps)."""
    from pipelines.blora import TrainRequest, train_blora

    options = dict(model="tiny-sdxl", steps=steps, rank=4, learning_rate=1e-3, checkpoint_every=10,
                   sample_steps=2)
    options.update(overrides)
    return train_blora(TrainRequest(image=EXAMPLES / image, out=out, **options))


@pytest.fixture(scope="session")
def cat_package(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("pkgs") / "cat", "cat.jpg")


@pytest.fixture(scope="session")
def coffee_package(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("pkgs") / "coffee", "coffee.jpg", token="[v7]")
