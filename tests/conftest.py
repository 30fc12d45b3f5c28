"""Shared fixtures: an isolated Block Studio home, tiny models built once, trained packages, and the app."""

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
    if cache and Path(cache, "lab", "models").is_dir():  # the adapter lab's pre-trained tiny backbones
        shutil.copytree(Path(cache, "lab", "models"), home / "lab" / "models")
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


# -- the app, served in-process ---------------------------------------------------------------------------


class StudioServer:
    """The studio launched on 127.0.0.1 for a test session, with helpers to drive it through gradio_client."""

    def __init__(self, demo, url: str) -> None:
        self.demo = demo
        self.url = url

    @property
    def studio(self):
        return self.demo.studio

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def session(self) -> tuple:
        """A fresh client and the new workspace the page would get on first load."""
        client = self.client()
        return client, client.predict(None, api_name="/workspace")


def _free_port() -> int:
    """A port the system just handed out: Gradio's own search from 7860 up lets two test runs on one machine
    pick the same port, and then one run's client talks to the other's server."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_studio(launch_options: dict | None = None, **build_kwargs) -> StudioServer:
    from studio.app import build_app, launch

    demo = build_app(**build_kwargs)
    _, url, _ = launch(demo=demo, port=_free_port(), prevent_thread_lock=True, quiet=True, **(launch_options or {}))
    return StudioServer(demo, url)


def stop_studio(server: StudioServer) -> None:
    server.demo.close()
    server.studio.jobs.close()


@pytest.fixture(scope="session")
def studio_server(blockstudio_home):
    """The studio with its Hub pushes going to a local stand-in; shared by the app tests of a session."""
    from tests.hub_standin import HUB_TOKEN, HubStandIn

    with HubStandIn(HUB_TOKEN) as hub:
        server = launch_studio(hub_endpoint=hub.url, gpu=False)
        server.hub = hub
        yield server
        stop_studio(server)


def start_job(client, workspace: str, image: Path, *, steps: int = 3, name: str = "", sample_every: int = 1,
              method: str = "b-lora", model: str = "tiny-sdxl") -> str:
    """Press Start training through /train; return the new job's id."""
    from gradio_client import handle_file

    picker = client.predict(workspace, handle_file(str(image)), method, model, name, steps, 4, 1e-4, 0,
                            sample_every, "", api_name="/train")[0]
    return picker["value"]


def job_record(client, workspace: str, job_id: str, action: str = "/job_status") -> dict:
    """The job record as the page's poll (or a button: /cancel, /resume) returns it."""
    outputs = client.predict(workspace, job_id, api_name=action)
    return next(o for o in outputs if isinstance(o, dict) and "status" in o)


def train_through_app(client, workspace: str, image: Path, *, steps: int = 3, name: str = "",
                      sample_every: int = 1, timeout: float = 300.0, **method) -> dict:
    """Start a job and poll it as the page does until it stops; return its record."""
    import time

    job_id = start_job(client, workspace, image, steps=steps, name=name, sample_every=sample_every, **method)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = job_record(client, workspace, job_id)
        if record["status"] not in ("queued", "running", "cancelling"):
            return record
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


@pytest.fixture(scope="session")
def trained(studio_server):
    """One workspace with two packages trained through the app: `cat` and `coffee`."""
    client, workspace = studio_server.session()
    for name in ("cat", "coffee"):
        record = train_through_app(client, workspace, EXAMPLES / f"{name}.jpg", name=name, sample_every=0)
        assert record["status"] == "done", record
    return client, workspace


def path_of(output) -> str:
    """A file output as gradio_client returns it: a path, a FileData dict, or a component update."""
    if isinstance(output, dict):
        output = output.get("value", output)
        if isinstance(output, dict):
            output = output["path"]
    return output
