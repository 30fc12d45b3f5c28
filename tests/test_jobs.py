"""The training service on its own: FIFO queue with positions, cancel, limits, restart and exact resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pipelines.training import TrainingCancelled
from studio.jobs import JobError, JobManager
from studio.workspace import new_workspace_id
from tests.conftest import EXAMPLES

SETTINGS = dict(method="b-lora", model="tiny-sdxl", steps=4, rank=4, learning_rate=1e-4)


class GatedRunner:
    """Stands in for train_blora: reports steps, then waits at a gate until the test lets it go on."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []

    def __call__(self, method, request, *, on_progress, on_sample, cancel, pipe) -> Path:
        from pipelines.training import ProgressEvent

        name = Path(request.out).name
        self.started.append(name)
        gate = self.gates.setdefault(name, threading.Event())
        on_progress(ProgressEvent(1, request.steps, 0.5, 0.1, 10.0, 0.3))
        while not gate.wait(0.01):
            if cancel.cancelled:
                raise TrainingCancelled("cancelled")
        return Path(request.out)


@pytest.fixture
def manager(tmp_path, monkeypatch):
    runner = GatedRunner()
    jobs = JobManager(tmp_path, runner=runner)
    monkeypatch.setattr(jobs, "_pipeline", lambda model: _NoPipe())
    yield jobs, runner
    for gate in runner.gates.values():
        gate.set()
    jobs.close()


class _NoPipe:
    def unload_lora_weights(self) -> None:
        pass


def _wait_for(predicate, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_jobs_run_one_at_a_time_in_order_with_visible_positions(manager):
    jobs, runner = manager
    alice, bob = new_workspace_id(jobs.home), new_workspace_id(jobs.home)
    first = jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="first", **SETTINGS)
    _wait_for(lambda: runner.started == ["first"])
    second = jobs.submit(bob, image=EXAMPLES / "coffee.jpg", name="second", **SETTINGS)
    third = jobs.submit(alice, image=EXAMPLES / "rocket.jpg", name="third", **SETTINGS)
    assert (jobs.position(first.id), jobs.position(second.id), jobs.position(third.id)) == (None, 1, 2)
    assert jobs.get(alice, first.id).status == "running"
    runner.gates["first"].set()
    _wait_for(lambda: runner.started == ["first", "second"])
    assert jobs.get(alice, first.id).status == "done"
    assert jobs.position(third.id) == 1
    jobs.cancel(alice, third.id)  # still queued: leaves the queue at once
    assert jobs.get(alice, third.id).status == "cancelled"
    runner.gates["second"].set()
    _wait_for(lambda: not jobs.get(bob, second.id).active)
    assert runner.started == ["first", "second"]


def test_each_owner_has_a_limit_and_sees_only_their_jobs(manager):
    jobs, _ = manager
    alice, bob = new_workspace_id(jobs.home), new_workspace_id(jobs.home)
    jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="cat0", **SETTINGS)
    with pytest.raises(JobError, match="already exists"):
        jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="cat0", **SETTINGS)
    for n in range(1, jobs.max_active_per_owner):
        jobs.submit(alice, image=EXAMPLES / "cat.jpg", name=f"cat{n}", **SETTINGS)
    with pytest.raises(JobError, match="already have 3 jobs"):
        jobs.submit(alice, image=EXAMPLES / "cat.jpg", **SETTINGS)
    assert jobs.jobs(bob) == []
    with pytest.raises(JobError, match="no such training job"):
        jobs.get(bob, jobs.jobs(alice)[0].id)


def test_a_restart_marks_running_jobs_interrupted_and_requeues_waiting_ones(tmp_path, monkeypatch):
    runner = GatedRunner()
    before = JobManager(tmp_path, runner=runner)
    monkeypatch.setattr(before, "_pipeline", lambda model: _NoPipe())
    owner = new_workspace_id(tmp_path)
    running = before.submit(owner, image=EXAMPLES / "cat.jpg", name="running", **SETTINGS)
    _wait_for(lambda: runner.started == ["running"])
    waiting = before.submit(owner, image=EXAMPLES / "coffee.jpg", name="waiting", **SETTINGS)
    # A crash leaves the records as they were: simulate it by reading them with a manager that does not run.
    after = JobManager(tmp_path, start=False)
    assert after.get(owner, running.id).status == "interrupted"
    assert after.get(owner, running.id).error == "the server stopped during training"
    assert after.get(owner, waiting.id).status == "queued" and after.position(waiting.id) == 0
    runner.gates["running"].set()
    runner.gates["waiting"] = threading.Event()
    before.close()


def test_resume_after_an_interruption_continues_from_the_checkpoint(tmp_path):
    """Real training: a shutdown at step 2 of 4 checkpoints the job; after a restart it resumes from there."""
    owner = new_workspace_id(tmp_path)
    jobs = JobManager(tmp_path)
    stopped = jobs.submit(owner, image=EXAMPLES / "cat.jpg", name="stopped", **dict(SETTINGS, sample_every=0))
    _wait_for(lambda: jobs.get(owner, stopped.id).step >= 2, timeout=120)
    jobs.close()  # a graceful shutdown checkpoints the running job and leaves it interrupted
    record = json.loads((tmp_path / "workspaces" / owner / "jobs" / stopped.id / "job.json").read_text())
    assert record["status"] == "interrupted" and record["checkpoint_step"] >= 2

    again = JobManager(tmp_path)
    try:
        again.resume(owner, stopped.id)
        done = again.wait(owner, stopped.id, timeout=300)
    finally:
        again.close()
    checkpoint = record["checkpoint_step"]
    assert done.status == "done" and done.resumed_from == checkpoint
    assert len(done.losses) == 4
    assert done.losses[:checkpoint] == record["losses"][:checkpoint]  # the steps before it are not redone
    assert (tmp_path / "workspaces" / owner / "packages" / "stopped" / "adapter.json").is_file()
    assert not (tmp_path / "workspaces" / owner / "packages" / "stopped.partial").exists()
