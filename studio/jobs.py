"""Training jobs: a first-in first-out queue served by one worker (one job per GPU at a time), records on disk.

Each job has a JSON record in its owner's workspace (`jobs/<id>/job.json`) with its status, step, loss
history, speed, ETA, previews, checkpoint and error, so the page can re-read it after a reload and the server
finds it again after a restart. Cancelling sets the loop's `CancelToken`: training stops before the next step
and keeps a checkpoint, from which the job resumes exactly. Jobs found running when the server starts were cut
off by a crash; they become `interrupted` and resume from their last checkpoint.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.errors import BlockStudioError
from pipelines.images import load_image
from pipelines.package import check_token
from pipelines.storage import atomic_file, home_dir, write_json
from pipelines.training import CancelToken, TrainingCancelled, TrainingPaused, latest_checkpoint, work_dir_for
from studio.library import Library, check_package_name
from studio.methods import METHODS, Method, check_model, method_for
from studio.workspace import Workspace, WorkspaceError, is_workspace_id, workspaces_root

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running", "cancelling")
RESUMABLE = ("cancelled", "failed", "interrupted")
STATUSES = ACTIVE + RESUMABLE + ("done", "discarded")
_JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
RECORD_WRITE_INTERVAL_S = 0.5  # a record is rewritten at most this often while training (and at every change of status)
MAX_STEPS = 20_000


class JobError(BlockStudioError):
    """A job request that cannot be honoured (unknown job, wrong state, too many jobs)."""


@dataclass
class JobRecord:
    id: str
    owner: str
    method: str
    model: str
    name: str  # the package it writes: <workspace>/packages/<name>
    settings: dict[str, Any]
    status: str = "queued"
    step: int = 0
    total: int = 0
    losses: list[float] = field(default_factory=list)
    it_s: float | None = None
    eta_s: float | None = None
    samples: list[str] = field(default_factory=list)  # file names under jobs/<id>/samples/
    checkpoint_step: int | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    resumed_from: int | None = None
    runs: int = 0
    paused_at: int | None = None  # trained in chunks (ZeroGPU): the step its last chunk stopped at

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def resumable(self) -> bool:
        return self.status in RESUMABLE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


Runner = Callable[..., Path]


def run_training(method: Method, request: Any, **callbacks: Any) -> Path:
    """Call the method's train function (`train_blora`, `train_splitflux`)."""
    _, train = method.functions()
    return train(request, **callbacks)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


class JobManager:
    """The process-wide training service: a FIFO queue, one worker thread, records on disk."""

    def __init__(self, home: Path | None = None, *, runner: Runner = run_training, max_active_per_owner: int = 3,
                 start: bool = True) -> None:
        self.home = Path(home) if home is not None else home_dir()
        self.max_active_per_owner = max_active_per_owner
        self._runner = runner
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._records: dict[str, JobRecord] = {}
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._tokens: dict[str, CancelToken] = {}
        self._pipes: dict[str, Any] = {}
        self._last_write: dict[str, float] = {}
        self._stopping = False
        self._recover()
        self._thread = threading.Thread(target=self._work, name="blockstudio-training", daemon=True)
        if start:
            self._thread.start()

    # -- records on disk ---------------------------------------------------------------------------------

    def _job_dir(self, record: JobRecord) -> Path:
        return Workspace(record.owner, self.home).jobs / record.id

    def job_file(self, record: JobRecord, name: str) -> Path:
        """A file of the job's folder (source.png, samples/step-000010.png)."""
        return self._job_dir(record) / name

    def _save(self, record: JobRecord) -> None:
        write_json(self._job_dir(record) / "job.json", record.to_dict())
        self._last_write[record.id] = time.monotonic()

    def _recover(self) -> None:
        """Load every record; running ones were cut off by a restart, queued ones wait again in order."""
        root = workspaces_root(self.home)
        found = []
        for path in root.glob("*/jobs/*/job.json") if root.is_dir() else []:
            try:
                record = JobRecord.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError):
                log.warning("skipping unreadable job record %s", path)
                continue
            if not is_workspace_id(record.owner) or record.id != path.parent.name:
                continue
            found.append(record)
        for record in sorted(found, key=lambda r: r.created):
            self._records[record.id] = record
            if record.status in ("running", "cancelling"):
                record.status = "interrupted"
                record.error = "the server stopped during training"
                record.checkpoint_step = self._checkpoint_step(record)
                record.it_s = record.eta_s = None
                self._save(record)
            elif record.status == "queued":
                self._queue.append(record.id)

    def _checkpoint_step(self, record: JobRecord) -> int | None:
        out = Workspace(record.owner, self.home).packages / record.name
        checkpoint = latest_checkpoint(work_dir_for(out))
        return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else None

    # -- queries -----------------------------------------------------------------------------------------

    def _find(self, owner: str, job_id: str) -> JobRecord:
        if not is_workspace_id(owner):
            raise WorkspaceError("this page has no valid workspace; reload the page to get one")
        record = self._records.get(job_id) if isinstance(job_id, str) and _JOB_ID_RE.match(job_id) else None
        if record is None or record.owner != owner:
            raise JobError("no such training job in your workspace")
        return record

    def get(self, owner: str, job_id: str) -> JobRecord:
        with self._lock:
            return copy.deepcopy(self._find(owner, job_id))

    def jobs(self, owner: str, limit: int = 20) -> list[JobRecord]:
        """The owner's jobs, newest first."""
        with self._lock:
            mine = [r for r in self._records.values() if r.owner == owner and r.status != "discarded"]
            return [copy.deepcopy(r) for r in sorted(mine, key=lambda r: r.created, reverse=True)[:limit]]

    def latest(self, owner: str) -> JobRecord | None:
        """The job a returning user most wants to see: the newest active one, else the newest."""
        mine = self.jobs(owner)
        return next((r for r in mine if r.active), mine[0] if mine else None)

    def position(self, job_id: str) -> int | None:
        """How many jobs run or wait before this one (0: it is next); None when it is not queued."""
        with self._lock:
            if job_id not in self._queue:
                return None
            return list(self._queue).index(job_id) + (1 if self._running else 0)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue) + (1 if self._running else 0)

    def wait(self, owner: str, job_id: str, timeout: float = 300.0) -> JobRecord:
        """Block until the job leaves the queue and the worker (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.get(owner, job_id)
            if not record.active:
                return record
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {record.status} after {timeout:.0f}s")

    # -- commands ----------------------------------------------------------------------------------------

    def submit(self, owner: str, *, image: str | Path, method: str, model: str, name: str | None = None,
               steps: int, rank: int, learning_rate: float, seed: int = 0, sample_every: int = 0,
               token: str | None = None, sample_steps: int | None = None) -> JobRecord:
        """Check everything, copy the image into the job, and queue it. Errors name the field to fix."""
        workspace = Workspace(owner, self.home)
        chosen = method_for(method)
        spec = check_model(model, chosen.arch)
        steps, rank, seed, sample_every = int(steps), int(rank), int(seed), int(sample_every or 0)
        if not 1 <= steps <= MAX_STEPS:
            raise JobError(f"steps must be between 1 and {MAX_STEPS}, not {steps}")
        if not 1 <= rank <= 256:
            raise JobError(f"rank must be between 1 and 256, not {rank}")
        if not 0 < float(learning_rate) < 1:
            raise JobError(f"learning rate must be between 0 and 1, not {learning_rate}")
        if sample_every < 0:
            raise JobError("preview interval must be 0 (off) or a number of steps")
        token = check_token(token.strip()) if token and token.strip() else None
        extras = chosen.extra_values(rank)
        # The job trains from its own copy (the upload cache may be emptied before a resume); encoding it
        # here keeps the lock, which every page's poll takes, free of image work.
        buffer = io.BytesIO()
        load_image(image).save(buffer, format="PNG")
        library = Library(workspace)
        with self._lock:
            self._check_room(owner)
            taken = {r.name for r in self._records.values() if r.owner == owner and r.status != "discarded"}
            if name and name.strip():
                name = check_package_name(name.strip())
                if name in taken or not library.is_free(name):
                    raise JobError(f"a package or job named {name!r} already exists; choose another name")
            else:
                name = library.unique_name(Path(str(image)).stem, taken)
            record = JobRecord(
                id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", owner=owner, method=chosen.key,
                model=spec.name, name=name, total=steps, created=time.time(),
                settings={"steps": steps, "rank": rank, "learning_rate": float(learning_rate), "seed": seed,
                          "sample_every": sample_every, "token": token, "sample_steps": sample_steps,
                          "extras": extras},
            )
            with atomic_file(self._job_dir(record) / "source.png") as tmp:
                tmp.write_bytes(buffer.getvalue())
            self._records[record.id] = record
            return self._enqueue(record)

    def _check_room(self, owner: str) -> None:
        """One user may not fill the queue: a few active jobs each (the caller holds the lock)."""
        mine = [r for r in self._records.values() if r.owner == owner and r.active]
        if len(mine) >= self.max_active_per_owner:
            raise JobError(f"you already have {len(mine)} jobs queued or running; wait for one or cancel it")

    def _enqueue(self, record: JobRecord) -> JobRecord:
        """Put a job at the end of the queue and wake the worker (the caller holds the lock)."""
        record.status = "queued"
        self._queue.append(record.id)
        self._save(record)
        self._wake.notify_all()
        return copy.deepcopy(record)

    def cancel(self, owner: str, job_id: str) -> JobRecord:
        """Queued: taken out of the queue. Running: stops before its next step and keeps a checkpoint."""
        with self._lock:
            record = self._find(owner, job_id)
            if record.status == "queued":
                self._queue.remove(job_id)
                record.status = "cancelled"
                record.finished = time.time()
                self._save(record)
            elif record.status == "running":
                record.status = "cancelling"
                self._tokens[job_id].cancel()
                self._save(record)
            elif record.status != "cancelling":
                raise JobError(f"this job is {record.status}; only queued or running jobs can be cancelled")
            return copy.deepcopy(record)

    def resume(self, owner: str, job_id: str) -> JobRecord:
        """Queue a cancelled, failed or interrupted job again; it continues from its last checkpoint."""
        with self._lock:
            record = self._find(owner, job_id)
            if not record.resumable:
                raise JobError(f"this job is {record.status}; only cancelled, failed or interrupted jobs resume")
            self._check_room(owner)
            record.error = None
            record.finished = None
            record.paused_at = None
            return self._enqueue(record)

    def discard(self, owner: str, job_id: str) -> None:
        """Forget a stopped job and delete its checkpoints (its name becomes free again)."""
        with self._lock:
            record = self._find(owner, job_id)
            if not record.resumable:
                raise JobError(f"this job is {record.status}; only stopped jobs can be discarded")
            record.status = "discarded"
            out = Workspace(owner, self.home).packages / record.name
            shutil.rmtree(work_dir_for(out), ignore_errors=True)
            self._save(record)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker; a running job is checkpointed and left `interrupted`, to resume after a restart."""
        with self._lock:
            self._stopping = True
            for token in self._tokens.values():
                token.cancel()
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                job_id = self._queue.popleft()
                record = self._records[job_id]
                token = CancelToken()
                self._tokens[job_id] = token
                self._running = job_id
                record.status = "running"
                record.started = time.time()
                record.runs += 1
                record.it_s = record.eta_s = None
                self._save(record)
            try:
                self._run(record, token)
                outcome, error = "done", None
            except TrainingPaused as exc:
                # A chunk of a job trained in chunks: back of the queue, so other jobs run before its next chunk.
                outcome, error = ("interrupted" if self._stopping else "queued"), None
                record.paused_at = exc.step
            except TrainingCancelled:
                outcome, error = ("interrupted" if self._stopping else "cancelled"), None
            except BlockStudioError as exc:
                outcome, error = "failed", one_line(exc)
            except Exception as exc:  # a bug or a resource problem: the page gets one line, the log the trace
                log.exception("training job %s failed", job_id)
                outcome, error = "failed", f"{type(exc).__name__}: {one_line(exc)}"
            with self._lock:
                record.status = outcome
                record.error = Workspace(record.owner, self.home).scrub(error) if error else None
                record.finished = None if outcome == "queued" else time.time()
                record.eta_s = 0.0 if outcome == "done" else None
                record.checkpoint_step = None if outcome == "done" else self._checkpoint_step(record)
                self._tokens.pop(job_id, None)
                self._running = None
                if outcome == "queued":
                    self._queue.append(job_id)
                self._save(record)

    def _pipeline(self, model: str):
        # One warm training pipeline: loading SDXL or Flux again for every job would cost far more than a step.
        if model not in self._pipes:
            self._pipes.clear()
            from pipelines.models import load_pipeline

            self._pipes[model] = load_pipeline(model)
        return self._pipes[model]

    def _run(self, record: JobRecord, token: CancelToken) -> Path:
        method = METHODS[record.method]
        workspace = Workspace(record.owner, self.home)
        settings = record.settings
        folder = self._job_dir(record)
        steps = int(settings["steps"])
        request = method.build_request(
            image=folder / "source.png", out=workspace.packages / record.name, model=record.model, steps=steps,
            rank=settings["rank"], learning_rate=settings["learning_rate"], seed=settings["seed"],
            token=settings.get("token"), sample_every=settings.get("sample_every") or 0,
            sample_steps=settings.get("sample_steps"), checkpoint_every=max(1, min(250, steps // 10)),
            samples=True, resume=record.runs > 1, **settings.get("extras", {}),
        )
        first_event = [True]

        def on_progress(event) -> None:
            with self._lock:
                if first_event[0]:
                    first_event[0] = False
                    if record.paused_at is None:  # the next chunk of a chunked job is no resume
                        record.resumed_from = event.step - 1 if event.step > 1 else None
                    record.paused_at = None
                # After a resume the loop repeats the steps after its checkpoint: keep one loss per step.
                del record.losses[event.step - 1:]
                record.losses.append(round(float(event.loss), 6))
                record.step, record.total = event.step, event.total_steps
                record.it_s = round(event.steps_per_s, 3)
                record.eta_s = round(event.eta_s, 1) if event.eta_s == event.eta_s and event.eta_s != float("inf") else None
                due = time.monotonic() - self._last_write.get(record.id, 0.0) >= RECORD_WRITE_INTERVAL_S
                if due or event.step == event.total_steps:
                    self._save(record)

        def on_sample(step: int, image) -> None:
            name = f"step-{step:06d}.png"
            with atomic_file(folder / "samples" / name) as tmp:
                image.save(tmp, format="PNG")
            with self._lock:
                if name not in record.samples:
                    record.samples.append(name)
                self._save(record)

        pipe = self._pipeline(record.model)
        try:
            return self._runner(method, request, on_progress=on_progress, on_sample=on_sample, cancel=token,
                                pipe=pipe)
        finally:
            try:
                # A stopped run leaves its training adapter in the model; the next job needs the bare base.
                pipe.unload_lora_weights()
            except Exception:
                self._pipes.clear()
