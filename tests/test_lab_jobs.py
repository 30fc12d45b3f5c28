"""Lab runs in the job queue: progress in the record, cancel at the next progress report, failures that leave
the worker serving, results saved in the job folder and read again after a restart."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.errors import BlockStudioError
from pipelines.lab import LabError, LabResult, LabSettingsError
from studio.jobs import JobError, JobManager
from studio.workspace import new_workspace_id
from tests import lab_fakes
from tests.conftest import EXAMPLES


@pytest.fixture
def lab(tmp_path, monkeypatch):
    fake = lab_fakes.install(monkeypatch)
    jobs = JobManager(tmp_path)
    yield jobs, fake
    fake.gate.set()
    jobs.close()


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_a_lab_job_reports_progress_and_saves_its_result_in_the_job_folder(lab, tmp_path):
    jobs, fake = lab
    owner = new_workspace_id(jobs.home)
    record = jobs.submit_lab(owner, "lora", {"steps": "4", "wait": True})
    assert (record.kind, record.status, record.settings["steps"]) == ("lab", "queued", 4)
    _wait_for(fake.started.is_set)
    _wait_for(lambda: jobs.get(owner, record.id).message == "waiting at the gate")
    running = jobs.get(owner, record.id)
    assert running.status == "running" and running.elapsed_s is not None and running.fraction == 0.0
    fake.gate.set()
    done = jobs.wait(owner, record.id, timeout=20)
    assert (done.status, done.fraction, done.error, done.result) == ("done", 1.0, None, "result")
    folder = jobs.lab_result_folder(done)
    assert folder == tmp_path / "workspaces" / owner / "jobs" / record.id / "result"
    result = LabResult.load(folder)
    assert result.summary == "ran 4 steps" and result.figure_paths["squares"].is_file()
    assert result.settings["steps"] == 4
    on_disk = json.loads((folder.parent / "job.json").read_text())
    assert on_disk["kind"] == "lab" and on_disk["status"] == "done"

    # After a restart the finished run and its result are found again.
    again = JobManager(tmp_path, start=False)
    assert again.latest(owner, kind="lab", method="lora").id == record.id
    assert LabResult.load(again.lab_result_folder(again.get(owner, record.id))).summary == "ran 4 steps"


def test_cancel_stops_a_lab_run_at_its_next_progress_report(lab):
    jobs, fake = lab
    owner = new_workspace_id(jobs.home)
    record = jobs.submit_lab(owner, "lora", {"wait": True})
    _wait_for(fake.started.is_set)
    assert jobs.cancel(owner, record.id).status == "cancelling"
    stopped = jobs.wait(owner, record.id, timeout=10)
    assert stopped.status == "cancelled" and stopped.result is None and not fake.gate.is_set()
    # Run again: a stopped lab job starts from the beginning.
    fake.gate.set()
    assert jobs.resume(owner, record.id).status == "queued"
    assert jobs.wait(owner, record.id, timeout=10).status == "done" and fake.runs == 2


def test_a_failing_experiment_fails_its_job_with_one_line_and_the_worker_goes_on(lab):
    jobs, fake = lab
    owner = new_workspace_id(jobs.home)
    broken = jobs.submit_lab(owner, "lora", {"fail": True})
    after = jobs.submit_lab(owner, "lora", {"steps": 2})
    failed = jobs.wait(owner, broken.id, timeout=10)
    assert failed.status == "failed"
    assert failed.error == ("the experiment failed (RuntimeError: the experiment broke on purpose); the details are "
                            "in the server log")
    assert jobs.wait(owner, after.id, timeout=10).status == "done"


def test_bad_settings_are_refused_before_anything_is_queued(lab):
    jobs, _ = lab
    owner = new_workspace_id(jobs.home)
    with pytest.raises(LabSettingsError, match="steps must be between 1 and 100, not 1000"):
        jobs.submit_lab(owner, "lora", {"steps": 1000})
    with pytest.raises(LabSettingsError, match="unknown setting 'rank'"):
        jobs.submit_lab(owner, "lora", {"rank": 4})
    with pytest.raises(LabError, match="no lab experiment for 'nope'"):
        jobs.submit_lab(owner, "nope", {})
    with pytest.raises(BlockStudioError, match="no valid workspace"):
        jobs.submit_lab("../other", "lora", {})
    assert jobs.jobs(owner, kind=None) == []


def test_lab_jobs_share_the_per_user_limit_and_stay_out_of_the_training_list(lab, monkeypatch):
    jobs, fake = lab
    owner = new_workspace_id(jobs.home)
    for _ in range(jobs.max_active_per_owner):
        jobs.submit_lab(owner, "lora", {"wait": True})
    with pytest.raises(JobError, match="already have 3 jobs"):
        jobs.submit(owner, image=EXAMPLES / "cat.jpg", method="b-lora", model="tiny-sdxl", steps=2, rank=4,
                    learning_rate=1e-4)
    assert jobs.jobs(owner) == [] and jobs.latest(owner) is None
    assert len(jobs.jobs(owner, kind="lab")) == 3


def test_a_lab_job_cut_off_by_a_restart_is_interrupted_and_can_run_again(tmp_path, monkeypatch):
    fake = lab_fakes.install(monkeypatch)
    before = JobManager(tmp_path)
    owner = new_workspace_id(tmp_path)
    record = before.submit_lab(owner, "lora", {"wait": True})
    _wait_for(fake.started.is_set)
    after = JobManager(tmp_path, start=False)
    cut = after.get(owner, record.id)
    assert (cut.status, cut.error, cut.checkpoint_step) == ("interrupted", "the server stopped during the run", None)
    fake.gate.set()
    before.close()
