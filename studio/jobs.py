"""Training and lab jobs: records on disk (the truth), a queue policy, and a worker that runs them.

Each job has a JSON record in its owner's workspace (`jobs/<id>/job.json`) with its status, step, loss
history, speed, ETA, previews, checkpoint, error, where it runs and when it joined the queue, so the page can
re-read it after a reload, the server finds it again after a restart, and `blockstudio jobs` lists the queue
with no server running. A cancel request is the status `cancelling` on disk; it sets the run's `CancelToken`:
training stops before the next step and keeps a checkpoint, from which the job resumes exactly. Jobs found
running when the server starts were cut off by a crash; they become `interrupted` and resume from their last
checkpoint, as does a job whose worker process died.

The queue is a policy (`QueuePolicy`): first in first out, at most a few active jobs per user, a bound on the
jobs waiting in all, and as many running at once as the worker has slots (one job per GPU). The worker is a
protocol (`studio.workers`): the in-process worker by default, or a Ray cluster (`studio.ray_worker`) when
`BLOCKSTUDIO_RAY_ADDRESS` is set. The server's facts (backend, workers, GPUs, jobs running and waiting) are on
the page and, for operators, in `jobs-service.json` of the data folder.

A lab job (`kind="lab"`, queued by `submit_lab`) runs one adapter-lab experiment through the same queue, worker
and per-user limit. Its record carries the run's fraction done, message, elapsed time and ETA; cancelling stops
it at its next progress report; its result (`result.json` and the figures' PNGs) goes to `jobs/<id>/result/`.
A stopped lab job runs again from the start (an experiment takes seconds to minutes and keeps no checkpoints).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import checks
from pipelines.errors import BlockStudioError, explain, is_disk_full
from pipelines.images import load_image
from pipelines.package import check_token
from pipelines.storage import atomic_file, home_dir, write_json
from pipelines.training import (
    CancelToken,
    CorruptCheckpoint,
    TrainingCancelled,
    TrainingPaused,
    latest_checkpoint,
    verify_checkpoint,
    work_dir_for,
)
from studio.job_records import (  # noqa: F401 - the record store's names are the job service's too
    ACTIVE,
    RESUMABLE,
    SERVICE_FILE,
    STATUSES,
    JobRecord,
    operator_listing,
    queue_order,
    read_records,
    read_service,
)
from studio.library import CLAIMS, Library
from studio.methods import Method, check_model, method_for
from studio.workers import (
    Assignment,
    InProcessWorker,
    RemoteFailure,
    Reports,
    Worker,
    WorkerFacts,
    WorkerLost,
)
from studio.workspace import Workspace, WorkspaceError, is_workspace_id

log = logging.getLogger(__name__)

_JOB_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
RECORD_WRITE_INTERVAL_S = 0.5  # a record is rewritten at most this often while training (and at every change of status)
MAX_STEPS = 20_000
MAX_QUEUED = 20  # jobs waiting in the whole server's queue; more would wait for hours
UNSAVED_RETRY_S = 5.0
HEARTBEAT_S = 30.0  # how often a serving manager rewrites its service file (and asks the worker for its facts)


class JobError(BlockStudioError):
    """A job request that cannot be honoured (unknown job, wrong state, too many jobs)."""


Runner = Callable[..., Path]


@dataclass(frozen=True)
class QueuePolicy:
    """Who may queue a job and when it starts: first in first out; at most `per_owner` active jobs per user;
    at most `max_waiting` jobs waiting in all; as many running at once as the worker has slots (one per GPU)."""

    per_owner: int = 3
    max_waiting: int = MAX_QUEUED

    def check_room(self, owner_active: int, waiting: int) -> None:
        if owner_active >= self.per_owner:
            raise JobError(f"you already have {owner_active} jobs queued or running; wait for one or cancel it")
        if waiting >= self.max_waiting:
            raise JobError(f"the training queue is full ({waiting} jobs waiting); try again when it has moved on")

    @staticmethod
    def can_start(running: int, slots: int) -> bool:
        return running < max(slots, 1)

    @staticmethod
    def ahead(index: int, running: int, slots: int) -> int:
        """How many jobs run or wait before the `index`-th waiting one: those before it in the queue, and, when
        every slot is taken, the running jobs one of which must end first."""
        return index + max(0, running - max(slots, 1) + 1)


def run_training(method: Method, request: Any, **callbacks: Any) -> Path:
    """Call the method's train function (its spec's `train`: `train_blora`, `train_splitflux`, ...)."""
    _, train = method.functions()
    return train(request, **callbacks)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def failure_message(exc: BaseException, what: str = "training") -> str:
    """What a failed job's record says: the error's own line for a user's mistake, else what happened and what to do.

    `what` names the work that stopped ("training", "the experiment")."""
    if isinstance(exc, BlockStudioError):
        return one_line(exc)
    if isinstance(exc, RemoteFailure):  # made where it failed, by this function
        return str(exc)[:500]
    if is_disk_full(exc):
        return (f"the server's disk is full, so {what} stopped; free some space (or ask the admin to), then "
                "resume: it continues from its last checkpoint")
    explained = explain(exc)
    if explained:
        return explained
    return f"{what} failed ({type(exc).__name__}: {one_line(exc)}); the details are in the server log"


class JobManager:
    """The process-wide job service: records on disk, a FIFO queue under a `QueuePolicy`, and a `Worker` that runs
    the jobs (the in-process worker unless one is given: `worker=RayWorker(...)`).

    A dispatcher thread (`_thread`) starts queued jobs while the worker has a free slot, each on a thread of its
    own that waits for its run to end. `runner` replaces the train function of the in-process worker.
    """

    def __init__(self, home: Path | None = None, *, runner: Runner = run_training, worker: Worker | None = None,
                 max_active_per_owner: int = 3, max_queued: int = MAX_QUEUED, start: bool = True) -> None:
        self.home = Path(home) if home is not None else home_dir()
        self.policy = QueuePolicy(max_active_per_owner, max_queued)
        self.worker: Worker = worker or InProcessWorker(runner, load=lambda model: self._pipeline(model))
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._records: dict[str, JobRecord] = {}
        self._queue: deque[str] = deque()
        self._running: dict[str, threading.Thread] = {}
        self._tokens: dict[str, CancelToken] = {}
        self._last_write: dict[str, float] = {}
        self._unsaved: set[str] = set()  # records whose last write failed
        self._stopping = False
        self._served_since: float | None = None
        self._recover()
        self._thread = threading.Thread(target=self._work, name="blockstudio-jobs", daemon=True)
        if start:
            self._thread.start()

    @property
    def max_active_per_owner(self) -> int:
        return self.policy.per_owner

    @property
    def max_queued(self) -> int:
        return self.policy.max_waiting

    # -- records on disk ---------------------------------------------------------------------------------

    def _job_dir(self, record: JobRecord) -> Path:
        return Workspace(record.owner, self.home).jobs / record.id

    def job_file(self, record: JobRecord, name: str) -> Path:
        """A file of the job's folder (source.png, samples/step-000010.png)."""
        return self._job_dir(record) / name

    def _save(self, record: JobRecord) -> None:
        write_json(self._job_dir(record) / "job.json", record.to_dict())
        self._last_write[record.id] = time.monotonic()

    def _save_or_log(self, record: JobRecord) -> bool:
        """A save that a full disk (or any write error) cannot turn into a crash: the record in memory stays
        right, since the page reads that, and it is written again until it is on disk."""
        try:
            self._save(record)
        except OSError as exc:
            log.warning("could not write the record of job %s (%s); will try again", record.id, exc)
            self._unsaved.add(record.id)
            return False
        self._unsaved.discard(record.id)
        return True

    def _save_unsaved(self) -> None:
        """Write the records whose last save failed (the caller holds the lock)."""
        for job_id in list(self._unsaved):
            self._save_or_log(self._records[job_id])

    def _library(self, record: JobRecord) -> Library:
        return Library(Workspace(record.owner, self.home))

    def _holder(self, record: JobRecord) -> str:
        return f"job:{record.id}"

    def _recover(self) -> None:
        """Load every record; running ones were cut off by a restart, queued ones wait again in order."""
        found = read_records(self.home)
        for record in found:
            self._records[record.id] = record
            if record.kind != "lab" and record.status in ACTIVE + RESUMABLE:
                # The job owns its package name until it is done or discarded, as before the restart.
                if CLAIMS.claim(self._library(record).workspace.packages, [record.name], self._holder(record),
                                on_disk=False) is None:
                    log.warning("job %s: its package name %s is claimed twice", record.id, record.name)
            if record.status in ("running", "cancelling"):
                record.status = "interrupted"
                record.error = "the server stopped during " + ("the run" if record.kind == "lab" else "training")
                self._note_checkpoint(record)
                record.it_s = record.eta_s = None
                self._save_or_log(record)
        self._queue.extend(record.id for record in queue_order(found))

    def _note_checkpoint(self, record: JobRecord) -> None:
        """Record the step a stopped job would resume from; a damaged checkpoint is named and the job starts over."""
        if record.kind == "lab":  # a lab run starts over: it keeps no checkpoint
            return
        out = Workspace(record.owner, self.home).packages / record.name
        checkpoint = latest_checkpoint(work_dir_for(out))
        record.checkpoint_step, record.restart = None, False
        if checkpoint is None:
            return
        try:
            verify_checkpoint(checkpoint)
        except CorruptCheckpoint as exc:
            self._start_over(record, exc)
            return
        record.checkpoint_step = int(checkpoint.name.rsplit("-", 1)[1])

    @staticmethod
    def _start_over(record: JobRecord, exc: CorruptCheckpoint) -> None:
        path = exc.path or Path("checkpoint")
        where = f"{path.parent.name}/{path.name}" if path.parent.name.startswith("checkpoint-") else path.name
        record.restart = True
        record.checkpoint_step = None
        record.error = (f"its checkpoint cannot be read back ({where} is damaged), so it cannot resume; "
                        "Start again trains from the beginning")

    # -- queries -----------------------------------------------------------------------------------------

    def _find(self, owner: str, job_id: str) -> JobRecord:
        if not is_workspace_id(owner, self.home):
            raise WorkspaceError("this page has no valid workspace; reload the page to get one")
        record = self._records.get(job_id) if isinstance(job_id, str) and _JOB_ID_RE.fullmatch(job_id) else None
        if record is None or record.owner != owner:
            raise JobError("no such training job in your workspace")
        return record

    def get(self, owner: str, job_id: str) -> JobRecord:
        with self._lock:
            return copy.deepcopy(self._find(owner, job_id))

    def jobs(self, owner: str, limit: int = 20, kind: str | None = "training",
             method: str | None = None) -> list[JobRecord]:
        """The owner's jobs of `kind` (all kinds with None; of one `method` if given), newest first."""
        with self._lock:
            mine = [r for r in self._records.values() if r.owner == owner and r.status != "discarded"
                    and (kind is None or r.kind == kind) and (method is None or r.method == method)]
            return [copy.deepcopy(r) for r in sorted(mine, key=lambda r: r.created, reverse=True)[:limit]]

    def latest(self, owner: str, kind: str = "training", method: str | None = None) -> JobRecord | None:
        """The job a returning user most wants to see: the newest active one, else the newest."""
        mine = self.jobs(owner, kind=kind, method=method)
        return next((r for r in mine if r.active), mine[0] if mine else None)

    def position(self, job_id: str) -> int | None:
        """How many jobs run or wait before this one (0: it is next); None when it is not queued."""
        with self._lock:
            if job_id not in self._queue:
                return None
            return self.policy.ahead(list(self._queue).index(job_id), len(self._running), self.worker.facts().slots)

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._running)

    def facts(self) -> JobFacts:
        """Which backend serves, its workers and GPUs, and the jobs running and waiting now."""
        with self._lock:
            return JobFacts(self.worker.facts(), running=len(self._running), waiting=len(self._queue))

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
               token: str | None = None, sample_steps: int | None = None, adapter: str = "lora",
               options: dict[str, Any] | None = None) -> JobRecord:
        """Check everything, copy the image into the job, and queue it. Errors name the field to fix.

        `options` are the method's own settings from the Train form (its spec's form settings), checked by the
        spec. The package name is claimed here and stays the job's until it is done or discarded.
        """
        workspace = Workspace(owner, self.home)
        chosen = method_for(method)
        spec = check_model(model, chosen.arch)
        for label, value in (("package name", name), ("trigger token", token)):
            if value is not None and not isinstance(value, str):
                raise JobError(f"the {label} must be text, not {type(value).__name__}")
        steps = checks.whole_number(steps, "steps", 1, MAX_STEPS)
        rank = checks.whole_number(rank, "rank", 1, 256)
        learning_rate = checks.real_number(learning_rate, "learning rate", 0.0, 1.0, above_low=True)
        seed = checks.seed(seed)
        sample_every = checks.whole_number(sample_every or 0, "preview interval", 0, MAX_STEPS)
        if sample_steps is not None:
            sample_steps = checks.whole_number(sample_steps, "preview steps", 1, 1000)
        token = check_token(token.strip()) if token and token.strip() else None
        if adapter not in chosen.adapters:
            raise JobError(f"{chosen.label} trains with {' or '.join(chosen.adapters)} adapters, not {adapter!r}")
        extras = {**chosen.extra_values(rank), **chosen.form_values(options)}
        # The job trains from its own copy (the upload cache may be emptied before a resume); encoding it
        # here keeps the lock, which every page's poll takes, free of image work.
        buffer = io.BytesIO()
        load_image(image).save(buffer, format="PNG")
        library = Library(workspace)
        with self._lock:
            self._check_room(owner)
            job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            holder = f"job:{job_id}"
            try:
                name = library.claim(name.strip() if name and name.strip() else None, holder,
                                     fallback=Path(str(image)).stem)
            except BlockStudioError as exc:
                raise JobError(str(exc)) from None
            record = JobRecord(
                id=job_id, owner=owner, method=chosen.key, model=spec.name, name=name, total=steps,
                created=time.time(),
                settings={"steps": steps, "rank": rank, "learning_rate": learning_rate, "seed": seed,
                          "sample_every": sample_every, "token": token, "sample_steps": sample_steps,
                          "extras": extras, "adapter": adapter},
            )
            try:
                with atomic_file(self._job_dir(record) / "source.png") as tmp:
                    tmp.write_bytes(buffer.getvalue())
                queued = self._enqueue(record)
            except BaseException:
                library.release(name, holder)
                shutil.rmtree(self._job_dir(record), ignore_errors=True)
                raise
            self._records[record.id] = record
            return queued

    def submit_lab(self, owner: str, method: str, settings: dict[str, Any] | None = None) -> JobRecord:
        """Queue a run of `method`'s lab experiment. The settings (UI or CLI values) are checked here, so a bad one
        is refused with one line naming the field before anything is queued."""
        from pipelines.lab import check_available, experiment_for, make_settings

        Workspace(owner, self.home)  # refuses a malformed workspace id
        experiment = experiment_for(method)
        check_available(experiment.method)
        checked = make_settings(experiment.method, settings)
        with self._lock:
            self._check_room(owner)
            record = JobRecord(
                id=f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}", owner=owner, method=experiment.method,
                model=checked.model_id or "built-in", name="", settings=checked.to_dict(), created=time.time(),
                kind="lab", total=1000,
            )
            self._records[record.id] = record
            return self._enqueue(record)

    def lab_result_folder(self, record: JobRecord) -> Path | None:
        """The folder holding a finished lab job's result (result.json and PNGs), or None."""
        if record.kind != "lab" or not record.result:
            return None
        return self._job_dir(record) / record.result

    def _check_room(self, owner: str) -> None:
        """No user may fill the queue, nor all users together (the caller holds the lock)."""
        mine = sum(1 for r in self._records.values() if r.owner == owner and r.active)
        self.policy.check_room(mine, len(self._queue))

    def _enqueue(self, record: JobRecord, **changes: Any) -> JobRecord:
        """Queue a job with `changes` to its record, once the record is on disk (the caller holds the lock)."""
        before = {key: getattr(record, key) for key in ("status", "queued_at", *changes)}
        for key, value in {"status": "queued", "queued_at": time.time(), **changes}.items():
            setattr(record, key, value)
        try:
            self._save(record)
        except BaseException:
            for key, value in before.items():
                setattr(record, key, value)
            raise
        self._queue.append(record.id)
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
                self._save_or_log(record)
            elif record.status == "running":
                record.status = "cancelling"
                self._tokens[job_id].cancel()
                self._save_or_log(record)
            elif record.status != "cancelling":
                raise JobError(f"this job is {record.status}; only queued or running jobs can be cancelled")
            return copy.deepcopy(record)

    def resume(self, owner: str, job_id: str) -> JobRecord:
        """Queue a cancelled, failed or interrupted job again; it continues from its last checkpoint (or starts
        over when that checkpoint is damaged)."""
        with self._lock:
            record = self._find(owner, job_id)
            if not record.resumable:
                raise JobError(f"this job is {record.status}; only cancelled, failed or interrupted jobs resume")
            self._check_room(owner)
            return self._enqueue(record, error=None, finished=None, paused_at=None)

    def discard(self, owner: str, job_id: str) -> None:
        """Forget a stopped job and delete its checkpoints (its name becomes free again)."""
        with self._lock:
            record = self._find(owner, job_id)
            if not record.resumable:
                raise JobError(f"this job is {record.status}; only stopped jobs can be discarded")
            record.status = "discarded"
            if record.kind != "lab":
                out = Workspace(owner, self.home).packages / record.name
                shutil.rmtree(work_dir_for(out), ignore_errors=True)
                self._library(record).release(record.name, self._holder(record))
            self._save_or_log(record)

    def package_renamed(self, owner: str, old: str, new: str) -> None:
        """A finished job's record follows its package to its new name (the job list, its samples)."""
        with self._lock:
            for record in self._records.values():
                if record.owner == owner and record.status == "done" and record.name == old:
                    record.name = new
                    self._save(record)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker; a running job is checkpointed and left `interrupted`, to resume after a restart."""
        with self._lock:
            self._stopping = True
            for token in self._tokens.values():
                token.cancel()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.worker.close()
        if self._served_since is not None:
            self._write_service(stopped=True)

    # -- the dispatcher ----------------------------------------------------------------------------------

    def _work(self) -> None:
        """Start queued jobs in order while the worker has a free slot. Nothing a job does (a bug, a full disk,
        a failed save, a lost worker) ends this loop."""
        self._served_since = time.time()
        heartbeat = 0.0
        while True:
            if time.monotonic() - heartbeat >= HEARTBEAT_S:
                heartbeat = time.monotonic()
                self._refresh_facts()  # may ask a cluster: outside the lock
            with self._wake:
                self._save_unsaved()
                if self._stopping:
                    return
                if not self._queue or not self.policy.can_start(len(self._running), self.worker.facts().slots):
                    left = HEARTBEAT_S - (time.monotonic() - heartbeat)
                    self._wake.wait(timeout=max(0.01, min(left, UNSAVED_RETRY_S if self._unsaved else left)))
                    continue
                job_id = self._queue.popleft()
                record = self._records[job_id]
                token = CancelToken()
                self._tokens[job_id] = token
                record.status = "running"
                record.started = time.time()
                record.runs += 1
                record.it_s = record.eta_s = None
                self._save_or_log(record)
                thread = threading.Thread(target=self._serve, args=(record, token), name=f"blockstudio-job-{job_id}",
                                          daemon=True)
                self._running[job_id] = thread
                thread.start()
            self._write_service()

    def _refresh_facts(self) -> None:
        try:
            self.worker.refresh()
        except Exception as exc:  # the worker's own trouble must not stop the queue
            log.warning("could not refresh the worker's facts (%s)", exc)
        self._write_service()

    def _write_service(self, stopped: bool = False) -> None:
        """The service file of the data folder: who serves the jobs, for `blockstudio jobs` (and operators)."""
        if self._stopping and not stopped:  # a job's thread ending after close() must not undo its "stopped"
            return
        facts = self.worker.facts()
        data = {"backend": facts.backend, "address": facts.address, "slots": facts.slots, "workers": facts.workers,
                "gpus": facts.gpus, "detail": facts.detail, "pid": os.getpid(), "host": socket.gethostname(),
                "started": self._served_since, "updated": time.time(), "stopped": stopped}
        try:
            write_json(self.home / SERVICE_FILE, data)
        except OSError as exc:
            log.warning("could not write %s (%s)", SERVICE_FILE, exc)

    def _serve(self, record: JobRecord, token: CancelToken) -> None:
        """Run one job on its own thread and record its end."""
        outcome, error, damaged = self._attempt(record, token)
        with self._lock:
            try:
                self._finish(record, outcome, error, damaged)
            except Exception:
                log.exception("could not record the end of job %s", record.id)
            finally:
                self._tokens.pop(record.id, None)
                self._running.pop(record.id, None)
                self._wake.notify_all()
        self._write_service()

    def _attempt(self, record: JobRecord, token: CancelToken) -> tuple[str, str | None, CorruptCheckpoint | None]:
        """Run one job; return its outcome, the line its record shows when it failed, and a damaged checkpoint."""
        try:
            (self._run_lab if record.kind == "lab" else self._run)(record, token)
            return "done", None, None
        except TrainingPaused as exc:
            # One chunk of a job trained in chunks: it goes to the back of the queue (`_finish`).
            record.paused_at = exc.step
            return ("interrupted" if self._stopping else "queued"), None, None
        except TrainingCancelled:
            return ("interrupted" if self._stopping else "cancelled"), None, None
        except WorkerLost as exc:
            return "interrupted", str(exc), None
        except CorruptCheckpoint as exc:
            return "failed", None, exc
        except Exception as exc:  # the page gets one line; the log gets the traceback of anything unexpected
            if not isinstance(exc, BlockStudioError | RemoteFailure) and explain(exc) is None:
                log.exception("%s job %s failed", record.kind, record.id)
            return "failed", failure_message(exc, "the experiment" if record.kind == "lab" else "training"), None

    def _finish(self, record: JobRecord, outcome: str, error: str | None, damaged: CorruptCheckpoint | None) -> None:
        """Write a job's end into its record (the caller holds the lock)."""
        record.status = outcome
        record.error = Workspace(record.owner, self.home).scrub(error) if error else None
        record.finished = None if outcome == "queued" else time.time()
        record.eta_s = 0.0 if outcome == "done" else None
        if outcome == "done":
            record.checkpoint_step, record.restart = None, False
            if record.kind != "lab":
                self._library(record).release(record.name, self._holder(record))  # the package holds it now
        elif damaged is not None:
            self._start_over(record, damaged)
        else:
            self._note_checkpoint(record)
        if outcome == "queued":  # a paused chunk: other jobs run before its next one
            record.queued_at = time.time()
            self._queue.append(record.id)
        if self._save_or_log(record):
            self._save_unsaved()

    def _pipeline(self, model: str):
        """Load a base pipeline for the in-process worker (which keeps the last one warm)."""
        from pipelines.models import load_pipeline

        return load_pipeline(model)

    def _reports(self, record: JobRecord) -> Reports:
        """Where a worker's reports about `record` go: into the record (written at most every half second) and
        the job's folder."""
        folder = self._job_dir(record)
        first_event = [True]

        def placed(where: dict[str, Any]) -> None:
            with self._lock:
                record.worker = dict(where)
                self._save_or_log(record)

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
                    self._save_or_log(record)

        def on_sample(step: int, image) -> None:
            name = f"step-{step:06d}.png"
            with atomic_file(folder / "samples" / name) as tmp:
                image.save(tmp, format="PNG")
            with self._lock:
                if name not in record.samples:
                    record.samples.append(name)
                self._save_or_log(record)

        started = time.monotonic()

        def on_lab_progress(fraction: float, message: str) -> None:
            with self._lock:
                elapsed = time.monotonic() - started
                record.fraction = round(fraction, 4)
                record.step = int(fraction * record.total)
                record.message = message[:200]
                record.elapsed_s = round(elapsed, 1)
                # The ETA from the pace so far; none in the first moments, when loading dominates.
                record.eta_s = round(elapsed * (1 - fraction) / fraction, 1) if fraction >= 0.02 else None
                if time.monotonic() - self._last_write.get(record.id, 0.0) >= RECORD_WRITE_INTERVAL_S:
                    self._save_or_log(record)

        return Reports(progress=on_progress, sample=on_sample, lab_progress=on_lab_progress, placed=placed)

    def _run(self, record: JobRecord, token: CancelToken) -> None:
        """Train: the request values go to the worker, which calls the train function with them."""
        method = method_for(record.method)
        workspace = Workspace(record.owner, self.home)
        settings = record.settings
        steps = int(settings["steps"])
        values = dict(
            image=self._job_dir(record) / "source.png", out=workspace.packages / record.name, model=record.model,
            steps=steps, rank=settings["rank"], learning_rate=settings["learning_rate"], seed=settings["seed"],
            token=settings.get("token"), sample_every=settings.get("sample_every") or 0,
            sample_steps=settings.get("sample_steps"), checkpoint_every=max(1, min(250, steps // 10)),
            samples=True, resume=record.runs > 1 and not record.restart, restart=record.restart,
            adapter=settings.get("adapter", "lora"), **settings.get("extras", {}),
        )
        self.worker.run(Assignment(record.id, "training", method.key, record.model, values), self._reports(record),
                        token)

    def _run_lab(self, record: JobRecord, token: CancelToken) -> None:
        """Run a lab experiment; its progress goes into the record, its result into jobs/<id>/result/."""
        with self._lock:
            record.fraction, record.message, record.elapsed_s, record.result = 0.0, "starting", 0.0, None
            record.step = 0
        started = time.monotonic()
        job = Assignment(record.id, "lab", record.method, record.model, dict(record.settings),
                         result=self._job_dir(record) / "result")
        self.worker.run(job, self._reports(record), token)
        with self._lock:
            record.result = "result"
            record.fraction, record.step, record.message = 1.0, record.total, "done"
            record.elapsed_s = round(time.monotonic() - started, 1)


@dataclass(frozen=True)
class JobFacts:
    """What serves the jobs and how busy it is: for the page's line and the operator's listing."""

    worker: WorkerFacts
    running: int
    waiting: int

    def summary(self) -> str:
        """One line for the page (without the cluster's address)."""
        worker = self.worker
        gpus = f"{worker.gpus} GPU{'s' if worker.gpus != 1 else ''}" if worker.gpus else "no GPU"
        if worker.backend == "ray":
            where = (f"Jobs run on a Ray cluster: {worker.workers} worker{'s' if worker.workers != 1 else ''} up, "
                     f"{gpus}, {worker.slots} at a time")
        else:
            where = f"Jobs run in the studio's own process, one at a time ({worker.detail or gpus})"
        return f"{where} · {self.running} running, {self.waiting} waiting."
