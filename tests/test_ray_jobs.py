"""Jobs on a Ray cluster the test starts itself (two CPUs, loopback only): two users' jobs in worker processes,
progress and previews reaching the record, cancel within a step, exact resume, a killed worker leaving a
resumable job, packages only in their owners' workspaces, lab runs through the same queue, and the ops facts.

One cluster and as few training runs as possible (tiny-sdxl, 6 steps, rank 2): three jobs, two of them resumed.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
import torch

# Ray's switch for a cluster of this machine alone: every Ray process listens on the loopback address only. It is
# read when Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'blockstudio[ray]'; the test extra has it)")

from pipelines.package import AdapterPackage  # noqa: E402
from pipelines.training import latest_checkpoint, work_dir_for  # noqa: E402
from studio.jobs import JobManager  # noqa: E402
from studio.workspace import new_workspace_id  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402

HOLD_PREFIX = "held"  # a job whose package name starts with this waits after step HOLD_AT for a cancel
HOLD_AT = 2
SETTINGS = dict(method="b-lora", model="tiny-sdxl", steps=6, rank=2, learning_rate=1e-3, sample_every=2,
                sample_steps=1)


def held_runner(method, request, **callbacks):
    """The train function, except that a `held*` job waits after step 2 until it is cancelled (or its worker is
    killed): the test, not a race with a fast tiny model, decides when a cancel or a kill comes."""
    from studio.jobs import run_training

    cancel, report = callbacks["cancel"], callbacks["on_progress"]
    if Path(request.out).name.startswith(HOLD_PREFIX):
        def on_progress(event):
            report(event)
            deadline = time.monotonic() + 120
            while event.step == HOLD_AT and not cancel.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)

        callbacks = dict(callbacks, on_progress=on_progress)
    return run_training(method, request, **callbacks)


def quick_lab(method, settings, progress):
    """A stand-in lab experiment: four progress reports and a result with a figure, in milliseconds."""
    from pipelines.lab import LabResult
    from pipelines.lab.plots import line_plot

    for step in range(4):
        progress.update(step / 4, f"step {step + 1}/4")
    return LabResult(method=method, summary=f"ran in process {os.getpid()}", metrics={"steps": 4},
                     figures={"squares": line_plot({"x squared": ([1, 2, 3], [1, 4, 9])}, title="Squares",
                                                   xlabel="x", ylabel="x squared")})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_sdxl_path):
    """A local Ray cluster for this module: two CPUs, this machine only, its files under the test's folder."""
    folder = tmp_path_factory.mktemp("ray")
    (folder / "tmp").mkdir()
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "TMPDIR")}
    # Ray turns token authentication on for a new local cluster; with a token of its own, nothing is written to
    # ~/.ray. The workers' job folders go under the test's folder.
    os.environ.update(RAY_AUTH_TOKEN=secrets.token_hex(16), TMPDIR=str(folder / "tmp"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(folder / "r"), namespace="blockstudio-test",
             logging_level="ERROR")
    try:
        yield folder
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def service(cluster, tmp_path_factory):
    from studio.ray_worker import RayWorker

    home = tmp_path_factory.mktemp("server")
    jobs = JobManager(home, worker=RayWorker(workers=2, runner=held_runner, lab_runner=quick_lab))
    yield jobs
    jobs.close()


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _weights(package: Path) -> dict[str, torch.Tensor]:
    return AdapterPackage.open(package).state_dict("full")


def _same_weights(a: Path, b: Path) -> bool:
    a, b = _weights(a), _weights(b)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_jobs_on_a_ray_cluster(service, capsys):
    from studio.cli import main

    jobs = service
    home = jobs.home
    alice, bob = new_workspace_id(home), new_workspace_id(home)
    packages = {owner: home / "workspaces" / owner / "packages" for owner in (alice, bob)}

    # Two users' jobs at once, each in a worker process of its own.
    straight = jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="straight", **SETTINGS)
    held = jobs.submit(bob, image=EXAMPLES / "cat.jpg", name="held-b", **SETTINGS)
    _wait_for(lambda: jobs.get(bob, held.id).step == HOLD_AT)
    facts = jobs.facts()
    assert (facts.worker.backend, facts.worker.slots, facts.worker.workers) == ("ray", 2, 2)
    assert "Ray cluster" in facts.summary() and str(facts.worker.address) not in facts.summary()

    # Cancel reaches the worker within a step: the job stops at the step it held at, with its checkpoint here.
    jobs.cancel(bob, held.id)
    stopped = jobs.wait(bob, held.id, timeout=120)
    assert (stopped.status, stopped.step, len(stopped.losses), stopped.checkpoint_step) == ("cancelled", 2, 2, 2)
    assert latest_checkpoint(work_dir_for(packages[bob] / "held-b")).name == "checkpoint-000002"

    done = jobs.wait(alice, straight.id, timeout=300)
    assert done.status == "done" and done.error is None
    assert len(done.losses) == 6 and done.step == done.total == 6
    assert done.samples == ["step-000002.png", "step-000004.png", "step-000006.png"]
    assert all((home / "workspaces" / alice / "jobs" / done.id / "samples" / n).is_file() for n in done.samples)
    workers = {done.worker["pid"], stopped.worker["pid"]}
    assert len(workers) == 2 and os.getpid() not in workers and done.worker["node"] == "127.0.0.1"
    assert (packages[alice] / "straight" / "adapter.json").is_file()

    # Resume on the cluster: the checkpoint goes with the job, and the weights are an uninterrupted run's.
    jobs.resume(bob, held.id)
    resumed = jobs.wait(bob, held.id, timeout=300)
    assert resumed.status == "done" and resumed.resumed_from == HOLD_AT and len(resumed.losses) == 6
    assert resumed.losses[:HOLD_AT] == stopped.losses
    assert _same_weights(packages[alice] / "straight", packages[bob] / "held-b")

    # A worker process that dies leaves the job interrupted, resumable from the last checkpoint it sent.
    killed = jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="held-c", **SETTINGS)
    work = work_dir_for(packages[alice] / "held-c")
    _wait_for(lambda: (c := latest_checkpoint(work)) is not None and c.name == "checkpoint-000002")
    pid = jobs.get(alice, killed.id).worker["pid"]
    os.kill(pid, signal.SIGKILL)
    cut = jobs.wait(alice, killed.id, timeout=120)
    assert (cut.status, cut.error, cut.checkpoint_step) == ("interrupted", "the worker training it stopped", 2)

    # The operator's listing reads the records on disk.
    assert main(["jobs", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert "ray" in listing and "held-c" in listing and "interrupted" in listing

    jobs.resume(alice, killed.id)
    again = jobs.wait(alice, killed.id, timeout=300)
    assert again.status == "done" and again.resumed_from == HOLD_AT and again.worker["pid"] != pid
    assert _same_weights(packages[alice] / "straight", packages[alice] / "held-c")

    # Packages land in their owners' workspaces only, and nothing half-written is left beside them.
    assert sorted(p.name for p in packages[alice].iterdir()) == ["held-c", "straight"]
    assert sorted(p.name for p in packages[bob].iterdir()) == ["held-b"]

    # Lab runs use the same queue and workers; their result comes back into the job's folder.
    lab = jobs.submit_lab(alice, "lora", {})
    ran = jobs.wait(alice, lab.id, timeout=120)
    assert (ran.status, ran.fraction, ran.message) == ("done", 1.0, "done")
    result = json.loads((jobs.lab_result_folder(ran) / "result.json").read_text())
    assert result["summary"].startswith("ran in process ") and str(os.getpid()) not in result["summary"]
    assert (jobs.lab_result_folder(ran) / "squares.png").is_file()
