"""Shared test setup: an isolated Block Studio home per session, no network, one CPU thread per process."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=UserWarning)
# Tiny models gain nothing from threads, and two processes sharing a small CPU with OpenMP threads each
# slow down by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def blockstudio_home(tmp_path_factory) -> Path:
    """A fresh BLOCKSTUDIO_HOME per session (tiny models are built into it on first use)."""
    home = tmp_path_factory.mktemp("home")
    os.environ["BLOCKSTUDIO_HOME"] = str(home)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    return home
