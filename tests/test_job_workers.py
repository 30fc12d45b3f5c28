"""The job service's parts without a cluster: the queue policy and its order on disk, workers with several slots,
a lost worker, the byte stream a remote worker's files travel by, the ops facts and `blockstudio jobs`."""

from __future__ import annotations

import html
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import BlockStudioError
from pipelines.storage import TargetExists
from pipelines.training import TrainingCancelled, work_dir_for
from studio import streaming
from studio.jobs import SERVICE_FILE, JobFacts, JobManager
from studio.streaming import Area, Receiver, StreamError, batches, send_folder
from studio.workers import WorkerFacts, WorkerLost
from studio.workspace import new_workspace_id
from tests.conftest import EXAMPLES

SETTINGS = dict(method="b-lora", model="tiny-sdxl", steps=4, rank=4, learning_rate=1e-4)


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class FakeWorker:
    """A worker backend with `slots` slots whose runs wait at a gate per package name (or run `script`)."""

    backend = "fake"

    def __init__(self, slots: int = 2, script=None) -> None:
        self.slots = slots
        self.script = script
        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.values: list[dict] = []

    def facts(self) -> WorkerFacts:
        return WorkerFacts(self.backend, slots=self.slots, workers=self.slots, gpus=self.slots)

    def refresh(self) -> None:
        pass

    def run(self, job, reports, cancel) -> None:
        self.started.append(job.out.name)
        self.values.append(dict(job.values))
        reports.placed({"backend": "fake", "node": "10.0.0.9", "pid": 4242})
        if self.script is not None:
            return self.script(job)
        gate = self.gates.setdefault(job.out.name, threading.Event())
        while not gate.wait(0.01):
            if cancel.cancelled:
                raise TrainingCancelled("cancelled")

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()


# -- the queue ---------------------------------------------------------------------------------------------


def test_a_worker_with_two_slots_runs_two_jobs_at_once_and_the_third_waits(tmp_path):
    worker = FakeWorker(slots=2)
    jobs = JobManager(tmp_path, worker=worker)
    owners = [new_workspace_id(tmp_path) for _ in range(3)]
    try:
        records = [jobs.submit(owner, image=EXAMPLES / "cat.jpg", name=f"job{n}", **SETTINGS)
                   for n, owner in enumerate(owners)]
        _wait_for(lambda: worker.started == ["job0", "job1"])
        assert [jobs.get(o, r.id).status for o, r in zip(owners, records, strict=True)] == [
            "running", "running", "queued"]
        assert jobs.position(records[2].id) == 1  # one of the two running jobs must end first
        facts = jobs.facts()
        assert (facts.running, facts.waiting, facts.worker.slots) == (2, 1, 2)
        assert jobs.get(owners[0], records[0].id).worker == {"backend": "fake", "node": "10.0.0.9", "pid": 4242}
        assert "worker" not in jobs.get(owners[0], records[0].id).public_dict()
        worker.gates["job1"].set()
        _wait_for(lambda: worker.started == ["job0", "job1", "job2"])
        assert jobs.wait(owners[1], records[1].id).status == "done"
    finally:
        jobs.close()


def test_the_queue_order_on_disk_survives_a_restart(tmp_path):
    """A job queued again (a resume) waits behind the jobs queued before it, after a restart too."""
    jobs = JobManager(tmp_path, start=False)
    alice, bob = new_workspace_id(tmp_path), new_workspace_id(tmp_path)
    first = jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="first", **SETTINGS)
    second = jobs.submit(bob, image=EXAMPLES / "coffee.jpg", name="second", **SETTINGS)
    jobs.cancel(alice, first.id)
    jobs.resume(alice, first.id)
    assert (jobs.position(second.id), jobs.position(first.id)) == (0, 1)
    again = JobManager(tmp_path, start=False)
    assert (again.position(second.id), again.position(first.id)) == (0, 1)


def _write_checkpoint(work: Path, step: int) -> None:
    folder = work / f"checkpoint-{step:06d}"
    folder.mkdir(parents=True)
    for name in ("adapter", "optimizer", "rng"):
        save_file({"x": torch.zeros(2)}, folder / f"{name}.safetensors")
    (folder / "state.json").write_text(json.dumps({"step": step, "loss_history": [0.5] * step,
                                                   "optimizer": {"param_groups": [], "scalars": {}}}))


def test_a_lost_worker_leaves_the_job_interrupted_and_resumable_from_its_checkpoint(tmp_path):
    def script(job):
        if not job.values["resume"]:
            _write_checkpoint(work_dir_for(job.out), 3)
            raise WorkerLost("the worker training it stopped")

    worker = FakeWorker(slots=1, script=script)
    jobs = JobManager(tmp_path, worker=worker)
    owner = new_workspace_id(tmp_path)
    try:
        job = jobs.submit(owner, image=EXAMPLES / "cat.jpg", name="cut", **SETTINGS)
        cut = jobs.wait(owner, job.id)
        assert (cut.status, cut.error, cut.checkpoint_step) == ("interrupted", "the worker training it stopped", 3)
        assert jobs.resume(owner, job.id).status == "queued"
        assert jobs.wait(owner, job.id).status == "done"
        assert worker.values[-1]["resume"] and not worker.values[-1]["restart"]
    finally:
        jobs.close()


# -- the stream ---------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_streamed_folder_arrives_whole_and_only_once_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 5)  # several chunks per file without large files
    source = tmp_path / "source"
    (source / "kohya").mkdir(parents=True)
    (source / "adapter.json").write_text('{"name": "cat"}')
    (source / "kohya" / "cat.safetensors").write_bytes(bytes(range(23)))
    (source / "README.md").write_text("")
    target = tmp_path / "packages" / "cat"
    receiver = Receiver({"package": Area(lambda _: target, frozenset({".json", ".safetensors", ".md"}),
                                         replace=False)})
    events = list(send_folder("package", "", source))
    assert sum(e[0] == "file" for e in events) == 3 + 5 + 1  # chunks of 5 bytes; an empty file still travels
    for batch in batches(events[:-1], 10):
        for event in batch:
            receiver.apply(event)
    assert not target.exists()  # nothing at the target before the unit closes
    receiver.apply(events[-1])
    assert _tree(target) == _tree(source)
    assert [p.name for p in target.parent.iterdir()] == ["cat"]  # no staging folder left


@pytest.mark.parametrize("events", [
    [("open", "package", ""), ("file", "../escape.json", 0, b"{}")],
    [("open", "package", ""), ("file", "/etc/escape.json", 0, b"{}")],
    [("open", "package", ""), ("file", "a/../../escape.json", 0, b"{}")],
    [("open", "package", ""), ("file", ".hidden.json", 0, b"{}")],
    [("open", "package", ""), ("file", "a\\b.json", 0, b"{}")],
    [("open", "package", ""), ("file", "a/b/c/d/e.json", 0, b"{}")],
    [("open", "package", ""), ("file", "run.sh", 0, b"#!")],
    [("open", "package", ""), ("file", "a.json", 3, b"{}")],
    [("open", "package", ""), ("file", "a.json", True, b"{}")],
    [("open", "package", ""), ("file", "a.json", 0, "{}")],
    [("open", "package", ""), ("file", "a.json", 0, b"{}"), ("file", "a.json", 0, b"{}")],
    [("open", "package", ""), ("file", "a.json", 0, b"{}"), ("file", "a.json/b.json", 0, b"{}")],
    [("open", "package", ""), ("open", "package", "")],
    [("open", "elsewhere", "")],
    [("open", "checkpoint", "../checkpoint-000001")],
    [("open", "checkpoint", "checkpoint-1")],
    [("file", "a.json", 0, b"{}")],
    [("close",)],
    [("run-file", b"not json")],
    [("run-file", b"[1, 2]")],
    [["open", "package", ""]],
    [("unlink", "adapter.json")],
])
def test_a_stream_cannot_write_outside_its_target_or_smuggle_files(tmp_path, events):
    packages = tmp_path / "packages"
    packages.mkdir()
    work = tmp_path / "work"
    receiver = Receiver({
        "package": Area(lambda _: packages / "cat", frozenset({".json", ".safetensors"}), replace=False),
        "checkpoint": Area(lambda name: work / name, frozenset({".json"}), streaming.CHECKPOINT_NAME_RE),
    }, run_file=work / "job.json")
    with pytest.raises(StreamError):
        for event in events:
            receiver.apply(event)
    receiver.discard()
    assert list(packages.iterdir()) == [] and not work.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packages"]


def test_a_stream_never_replaces_a_package_that_is_there(tmp_path):
    target = tmp_path / "cat"
    target.mkdir()
    (target / "adapter.json").write_text("mine")
    receiver = Receiver({"package": Area(lambda _: target, frozenset({".json"}), replace=False)})
    for event in [("open", "package", ""), ("file", "adapter.json", 0, b"theirs")]:
        receiver.apply(event)
    with pytest.raises(TargetExists):
        receiver.apply(("close",))
    assert (target / "adapter.json").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["cat"]


# -- ops facts and the operator's listing --------------------------------------------------------------------


def test_the_page_says_what_serves_the_jobs_without_the_clusters_address(tmp_path):
    from studio.ui.train import render_status

    jobs = JobManager(tmp_path, start=False)
    line = jobs.facts().summary()
    assert line.startswith("Jobs run in the studio's own process, one at a time") and "0 running, 0 waiting" in line
    assert html.escape(line) in render_status(None, None, line)
    ray = JobFacts(WorkerFacts("ray", slots=4, workers=3, gpus=4, address="ray://10.0.0.5:10001"), running=2, waiting=5)
    assert ray.summary() == "Jobs run on a Ray cluster: 3 workers up, 4 GPUs, 4 at a time · 2 running, 5 waiting."


def _jobs_command(capsys, *args: str) -> tuple[int, str, str]:
    from studio.cli import main

    code = main(["jobs", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_blockstudio_jobs_lists_the_queue_from_disk_with_no_server(tmp_path, capsys):
    jobs = JobManager(tmp_path, start=False)
    alice, bob = new_workspace_id(tmp_path), new_workspace_id(tmp_path)
    first = jobs.submit(alice, image=EXAMPLES / "cat.jpg", name="first", **SETTINGS)
    second = jobs.submit(bob, image=EXAMPLES / "coffee.jpg", name="second", **SETTINGS)
    stopped = jobs.submit(bob, image=EXAMPLES / "rocket.jpg", name="stopped", **SETTINGS)
    jobs.cancel(bob, stopped.id)

    code, out, _ = _jobs_command(capsys, "--home", str(tmp_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "served by: no server has served this data folder yet"
    assert lines[1] == "jobs: 0 running, 2 waiting (done ones: --all)"
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[1], r[2], r[6]) for r in rows] == [
        ("1", first.id, "queued", "first"), ("2", second.id, "queued", "second"), ("-", stopped.id, "cancelled", "stopped")]
    assert alice not in out and bob not in out and alice[:8] + "…" in out  # workspace ids are secrets

    code, out, _ = _jobs_command(capsys, "--home", str(tmp_path), "--json")
    listing = json.loads(out)
    assert listing["service"] is None and [r["position"] for r in listing["jobs"]] == [1, 2, None]

    code, out, err = _jobs_command(capsys, "--home", str(tmp_path / "nowhere"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "not a folder" in err


def test_blockstudio_jobs_says_whether_a_server_serves_the_folder(tmp_path, capsys):
    served = JobManager(tmp_path, worker=FakeWorker(slots=2))
    _wait_for(lambda: (tmp_path / SERVICE_FILE).is_file())
    code, out, _ = _jobs_command(capsys, "--home", str(tmp_path))
    assert code == 0 and out.startswith("served by: fake · 2 worker(s) · 2 GPU(s) · 2 at a time · pid ")
    served.close()
    assert "the last server, fake" in _jobs_command(capsys, "--home", str(tmp_path))[1].splitlines()[0]

    # A server whose process ended without closing: its pid is no process of this machine any more.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    service = json.loads((tmp_path / SERVICE_FILE).read_text())
    (tmp_path / SERVICE_FILE).write_text(json.dumps({**service, "stopped": False, "pid": int(ended.stdout)}))
    assert "ended without stopping" in _jobs_command(capsys, "--home", str(tmp_path))[1].splitlines()[0]


# -- choosing the backend ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["http://head:10001", "ray://head", "ray://head:0", "ray://head:99999",
                                   "auto\n", "ray://he ad:10001", "ray://head:10001/x", "10.0.0.5:6379"])
def test_a_bad_ray_address_stops_the_server_with_one_line(monkeypatch, value):
    from studio.workers import worker_from_environment

    monkeypatch.setenv("BLOCKSTUDIO_RAY_ADDRESS", value)
    with pytest.raises(BlockStudioError, match=r"^BLOCKSTUDIO_RAY_ADDRESS must be auto or ray://host:port"):
        worker_from_environment()


def test_ray_addresses_and_worker_counts_that_are_taken():
    from studio.ray_worker import check_address, check_workers

    for value in ("auto", "ray://head:10001", "ray://10.0.0.5:10001", "ray://[::1]:10001", "ray://a.b-c.io:1"):
        assert check_address(value) == value
    assert (check_workers(None), check_workers(""), check_workers("3")) == (None, None, 3)
    for value in ("0", "-1", "2.5", "many", "99999"):
        with pytest.raises(BlockStudioError, match="BLOCKSTUDIO_RAY_WORKERS must be a whole number"):
            check_workers(value)


def test_a_ray_address_without_ray_installed_says_what_to_install(monkeypatch):
    from studio.workers import worker_from_environment

    monkeypatch.setenv("BLOCKSTUDIO_RAY_ADDRESS", "auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(BlockStudioError, match=r"Ray is not installed: pip install 'blockstudio\[ray\]'"):
        worker_from_environment()
