"""Jobs on a Ray cluster: each job runs in a worker process that holds one GPU, on whichever machine has one free.

`BLOCKSTUDIO_RAY_ADDRESS=auto` (a cluster this machine belongs to) or `ray://host:port` (Ray Client) turns it on;
`BLOCKSTUDIO_RAY_WORKERS` sets how many jobs run at once (default: one per GPU of the cluster, one on a cluster
without GPUs). The server keeps the records and the queue. A `JobActor` (one per slot, asking Ray for one GPU
where the cluster has GPUs) runs one job at a time through the same `InProcessWorker` the server uses alone, so
the train function, previews, cancel and the warm pipeline behave as they do there; the server polls it a few
times a second.

The worker machine shares no disk with the server. The job's image and request values go with it, and on a
resume its latest checkpoint; the worker streams back its progress, previews, every new checkpoint and, at the
end, the package or lab result (`studio.streaming`). The server writes them atomically where the in-process
worker would have: the package into the owner's workspace, a place it takes from the job's record, never from
the worker. Cancel rides on the next poll and stops the loop before its next step. A worker process that dies,
or a machine that leaves the cluster, leaves the job interrupted, to resume from the last checkpoint that
reached the server.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, fields
from itertools import chain
from pathlib import Path
from typing import Any

from pipelines.errors import BlockStudioError
from pipelines.package import check_name
from pipelines.recipes import recipe_by_key, recipe_for
from pipelines.training import (
    CancelToken,
    ProgressEvent,
    TrainingCancelled,
    latest_checkpoint,
    verify_checkpoint,
    work_dir_for,
)
from studio.library import PACKAGE_SUFFIXES
from studio.streaming import (
    CHECKPOINT_NAME_RE,
    CHUNK_BYTES,
    Area,
    Receiver,
    StreamError,
    batches,
    send_folder,
)
from studio.workers import (
    Assignment,
    InProcessWorker,
    RemoteFailure,
    Reports,
    WorkerFacts,
    WorkerLost,
    outcome_event,
    raise_outcome,
)

log = logging.getLogger(__name__)

NAMESPACE = "blockstudio"
POLL_WAIT_S = 0.25  # how long a poll waits for news; cancel reaches the worker at the next poll
POLL_BYTES = 4 * CHUNK_BYTES  # file data one poll (or one upload call) carries
POLL_TIMEOUT_S = 120.0  # a worker that does not answer a poll for this long is taken for lost
CHECKPOINT_SUFFIXES = frozenset({".safetensors", ".json"})
RESULT_SUFFIXES = frozenset({".json", ".png"})
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
_ADDRESS_RE = re.compile(rf"auto|ray://{_HOST}:(\d{{1,5}})")


def check_address(value: str) -> str:
    """`auto` or `ray://host:port`, else one line saying what the variable takes."""
    match = _ADDRESS_RE.fullmatch(value)
    if match is None or (match.group(1) is not None and not 1 <= int(match.group(1)) <= 65535):
        raise BlockStudioError("BLOCKSTUDIO_RAY_ADDRESS must be auto or ray://host:port (e.g. ray://10.0.0.5:10001), "
                               f"not {value[:80]!r}")
    return value


def check_workers(value: str | None) -> int | None:
    """How many jobs may run at once on the cluster (None: one per GPU)."""
    if value is None or not value.strip():
        return None
    if not re.fullmatch(r"\d{1,4}", value.strip()) or not 1 <= int(value) <= 1024:
        raise BlockStudioError(f"BLOCKSTUDIO_RAY_WORKERS must be a whole number from 1 to 1024, not {value[:40]!r}")
    return int(value)


def import_ray():
    try:
        import ray
    except ImportError:
        raise BlockStudioError("BLOCKSTUDIO_RAY_ADDRESS is set but Ray is not installed: pip install 'blockstudio[ray]' "
                               "on the server and every worker machine, or unset the variable to train in the "
                               "server's process") from None
    return ray


# -- the worker side: one job inside a JobActor -----------------------------------------------------------


class _RemoteJob:
    """One job in a worker process: its local folder, its run's thread, and what waits to be sent back."""

    def __init__(self, job_id: str, assignment: dict[str, Any], image: bytes | None) -> None:
        self.job_id = job_id
        self.root = Path(tempfile.mkdtemp(prefix="blockstudio-job-"))
        kind, values = assignment["kind"], dict(assignment["values"])
        self.recipe_module = str(assignment.get("recipe_module", ""))
        self.work: Path | None = None
        if kind == "lab":
            self.job = Assignment(job_id, kind, assignment["method"], assignment["model"], values, self.root / "result")
        else:
            values["out"] = self.root / "out" / check_name(Path(values["out"]).name)
            values["image"] = self.root / "source.png"
            values["image"].write_bytes(image or b"")
            self.job = Assignment(job_id, kind, assignment["method"], assignment["model"], values)
            self.work = work_dir_for(values["out"])
        areas = {} if self.work is None else {
            "checkpoint": Area(lambda name: self.work / name, CHECKPOINT_SUFFIXES, CHECKPOINT_NAME_RE)}
        self.uploads = Receiver(areas, run_file=None if self.work is None else self.work / "job.json")
        self.token = CancelToken()
        self.finished = False
        self._cond = threading.Condition()
        self._events: deque[tuple] = deque()
        self._units: deque[tuple[str, Iterator[tuple], Path | None]] = deque()  # (area, its events, its snapshot)
        self._sending: tuple[str, Iterator[tuple], Path | None] | None = None
        self._end: tuple | None = None
        self._checkpoint: str | None = None  # the newest checkpoint queued to be sent
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, worker: InProcessWorker) -> None:
        self._thread = threading.Thread(target=self._run, args=(worker,), name=f"blockstudio-{self.job_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self, worker: InProcessWorker) -> None:
        what = "the experiment" if self.job.kind == "lab" else "training"
        reports = Reports(progress=self._progress, sample=self._sample, lab_progress=self._lab_progress)
        end: tuple = ("failed", f"{what} stopped: its worker process is shutting down")
        try:
            if self.job.kind != "lab":
                recipe_by_key(self.job.method, self.recipe_module)  # a recipe outside the built-ins is imported
            worker.run(self.job, reports, self.token)
            folder = self.job.result if self.job.kind == "lab" else self.job.out
            area = "result" if self.job.kind == "lab" else "package"
            self._queue(area, send_folder(area, "", folder), None)
            end = ("done",)
        except Exception as exc:
            try:
                self._queue_checkpoint()  # a cancel or a pause writes one more checkpoint on its way out
            except OSError as error:
                log.warning("job %s: could not send its last checkpoint (%s)", self.job_id, error)
            end = outcome_event(exc, what=what, work=self.work, scrub=self._scrub)
        finally:
            with self._cond:
                self._end = end
                self._cond.notify_all()

    def _scrub(self, text: str) -> str:
        """A message without this machine's folder for the job (the server has its own paths)."""
        return text.replace(str(self.root) + os.sep, "").replace(str(self.root), "")

    # the train function's callbacks, turned into events

    def _emit(self, event: tuple, *, replace_last: str | None = None) -> None:
        with self._cond:
            if replace_last and self._events and self._events[-1][0] == replace_last:
                self._events[-1] = event
            else:
                self._events.append(event)
            self._cond.notify_all()

    def _progress(self, event: ProgressEvent) -> None:
        # The loop reports a step after writing its checkpoint: this is when a new one is there to send.
        self._queue_checkpoint()
        self._emit(("progress", asdict(event)))

    def _sample(self, step: int, image: Any) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self._emit(("sample", int(step), buffer.getvalue()))

    def _lab_progress(self, fraction: float, message: str) -> None:
        self._emit(("lab", float(fraction), str(message)[:200]), replace_last="lab")  # only the latest matters

    def _queue(self, area: str, events: Iterator[tuple], snapshot: Path | None) -> None:
        with self._cond:
            self._units.append((area, events, snapshot))
            self._cond.notify_all()

    def _queue_checkpoint(self) -> None:
        """Queue the run's newest checkpoint to be sent, from a snapshot (the loop deletes older checkpoints)."""
        checkpoint = latest_checkpoint(self.work) if self.work is not None else None
        if checkpoint is None or checkpoint.name == self._checkpoint:
            return
        self._checkpoint = checkpoint.name
        snapshot = self.root / "outbox" / checkpoint.name
        snapshot.mkdir(parents=True)
        for path in checkpoint.iterdir():
            if path.is_file() and not path.is_symlink():
                try:
                    os.link(path, snapshot / path.name)  # no copy: the loop replaces files, never rewrites them
                except OSError:
                    shutil.copy2(path, snapshot / path.name)
        run_file = (self.work / "job.json").read_bytes()
        events = chain([("run-file", run_file)], send_folder("checkpoint", checkpoint.name, snapshot))
        with self._cond:
            for unit in [u for u in self._units if u[0] == "checkpoint"]:  # only the newest checkpoint matters
                self._units.remove(unit)
                shutil.rmtree(unit[2], ignore_errors=True)
            self._units.append(("checkpoint", events, snapshot))
            self._cond.notify_all()

    def poll(self, cancelled: bool, wait_s: float, max_bytes: int) -> list[tuple]:
        """What happened since the last poll (with about `max_bytes` of files), then the end once all is sent."""
        if cancelled:
            self.token.cancel()
        with self._cond:
            if not (self._events or self._units or self._sending or self._end):
                self._cond.wait(wait_s)
            out = list(self._events)
            self._events.clear()
        budget = max_bytes
        while budget > 0:
            if self._sending is None:
                with self._cond:
                    if not self._units:
                        break
                    self._sending = self._units.popleft()
            event = next(self._sending[1], None)
            if event is None:
                if self._sending[2] is not None:
                    shutil.rmtree(self._sending[2], ignore_errors=True)
                self._sending = None
                continue
            out.append(event)
            budget -= len(event[3]) if event[0] == "file" else 0
        with self._cond:
            if self._end is not None and self._sending is None and not self._units:
                out.extend(self._events)
                self._events.clear()
                out.append(("end", *self._end))
                self.finished = True
        return out

    def cleanup(self) -> None:
        self.token.cancel()
        shutil.rmtree(self.root, ignore_errors=True)


class JobActor:
    """A Ray actor running one job at a time, in a worker process that holds one GPU (created by `RayWorker`).

    The server opens a job (its values and image), sends the checkpoint to resume from (`receive`), starts it,
    then polls it until its end; a poll also carries the cancel request.
    """

    def __init__(self, runner: Any = None, lab_runner: Any = None) -> None:
        from studio.cli import _quiet_libraries

        _quiet_libraries()  # no terminal here: progress bars would only fill the logs
        self.worker = InProcessWorker(runner, **({"lab_runner": lab_runner} if lab_runner is not None else {}))
        self.job: _RemoteJob | None = None
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        """Where this worker runs (for the job record and operators)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), None)
        return {"backend": "ray", "node": address, "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def open(self, job_id: str, assignment: dict[str, Any], image: bytes | None) -> None:
        with self._lock:
            if self.job is not None:
                if self.job.started and not self.job.finished:
                    raise RuntimeError(f"this worker is still running job {self.job.job_id}")
                self.job.cleanup()
            self.job = _RemoteJob(job_id, assignment, image)

    def receive(self, job_id: str, events: list[tuple]) -> None:
        job = self._job(job_id)
        try:
            for event in events:
                job.uploads.apply(event)
        except BaseException:
            job.uploads.discard()
            raise

    def start(self, job_id: str) -> None:
        self._job(job_id).start(self.worker)

    def poll(self, job_id: str, cancelled: bool, wait_s: float, max_bytes: int) -> list[tuple]:
        job = self._job(job_id)
        events = job.poll(bool(cancelled), min(float(wait_s), 5.0), int(max_bytes))
        if job.finished:
            with self._lock:
                job.cleanup()
                self.job = None
        return events

    def _job(self, job_id: str) -> _RemoteJob:
        job = self.job
        if job is None or job.job_id != job_id:
            raise RuntimeError(f"this worker has no job {job_id}")
        return job


# -- the server side --------------------------------------------------------------------------------------


def _progress_event(data: object) -> ProgressEvent:
    """A progress event from its fields, checked (a worker's reports are data like any other)."""
    names = {f.name for f in fields(ProgressEvent)}
    if not isinstance(data, dict) or not names >= set(data) or not {"step", "total_steps", "loss"} <= set(data):
        raise StreamError("refused a progress report with unknown fields")
    event = ProgressEvent(**data)
    for name in ("step", "total_steps"):
        if type(getattr(event, name)) is not int:
            raise StreamError(f"refused a progress report whose {name} is not a whole number")
    for name in ("loss", "elapsed_s", "steps_per_s", "eta_s"):
        if isinstance(getattr(event, name), bool) or not isinstance(getattr(event, name), (int, float)):
            raise StreamError(f"refused a progress report whose {name} is not a number")
    return event


def _drop_older_checkpoints(newest: Path) -> None:
    for old in newest.parent.glob("checkpoint-*"):
        if old.name < newest.name and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


class RayWorker:
    """Runs jobs on a Ray cluster, one per `JobActor`, up to `facts().slots` at once.

    Actors are made as jobs need them and kept (with their warm pipeline) for the next job; one whose process
    died is dropped, and the next job gets a new one. `runner` and `lab_runner` replace the train function and
    the lab's `run_experiment` in the workers (they must be importable there).
    """

    backend = "ray"

    def __init__(self, address: str | None = None, *, workers: int | None = None, runner: Any = None,
                 lab_runner: Any = None, cpus_per_job: float = 1.0) -> None:
        ray = import_ray()
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            except ImportError as exc:  # Ray Client's own packages
                raise BlockStudioError(f"{address} is a Ray Client address, which needs ray[client] ({exc}): pip "
                                       "install 'blockstudio[ray]'") from None
            except (ConnectionError, RuntimeError, ValueError) as exc:
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise BlockStudioError(f"could not join the Ray cluster at {address} ({reason}); start it (ray start "
                                       "--head) or fix BLOCKSTUDIO_RAY_ADDRESS") from None
        self.address = address or ray.get_runtime_context().gcs_address
        self.workers_setting = workers
        self.cpus_per_job = cpus_per_job
        self._actor_cls = ray.remote(JobActor)
        self._arguments = (runner, lab_runner)
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._busy: dict[str, Any] = {}
        self._placed: dict[str, dict[str, Any]] = {}
        self._closing = False
        self._gpus = 0
        self.refresh()

    def refresh(self) -> None:
        """Count the cluster's GPUs again (machines join and leave a cluster)."""
        try:
            self._gpus = int(self._ray.cluster_resources().get("GPU", 0))
        except Exception as exc:  # the cluster did not answer: keep the last count
            log.warning("could not count the Ray cluster's GPUs (%s)", exc)

    def facts(self) -> WorkerFacts:
        with self._lock:
            workers = len(self._idle) + len(self._busy)
        return WorkerFacts(self.backend, slots=self.workers_setting or max(self._gpus, 1), workers=workers,
                           gpus=self._gpus, address=self.address)

    def where(self, job_id: str) -> dict[str, Any] | None:
        """The worker running `job_id` (node, pid, GPUs), while it runs."""
        with self._lock:
            return dict(self._placed[job_id]) if job_id in self._placed else None

    def run(self, job: Assignment, reports: Reports, cancel: CancelToken) -> None:
        ray = self._ray
        what = "the experiment" if job.kind == "lab" else "training"
        actor = self._take(job.job_id)
        end = None
        try:
            placed = self._ready(actor, cancel)
            with self._lock:
                self._placed[job.job_id] = placed
            reports.placed(placed)
            self._send(actor, job)
            end = self._follow(actor, job, reports, cancel)
        except ray.exceptions.RayTaskError as exc:  # the worker's own code refused a call
            cause = getattr(exc, "cause", None) or exc
            log.error("job %s: its worker failed: %s", job.job_id, exc)
            raise RemoteFailure(f"{what} failed in its worker ({type(cause).__name__}: "
                                f"{str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''}); "
                                "the details are in the server log") from None
        except ray.exceptions.RayError as exc:
            log.warning("job %s: its worker %s stopped: %s", job.job_id, self.where(job.job_id) or "",
                        str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
            raise WorkerLost(f"the worker {'running' if job.kind == 'lab' else 'training'} it stopped") from None
        finally:
            self._give_back(job.job_id, actor, healthy=end is not None)
        if end[0] == "done" and job.kind != "lab" and not job.values.get("keep_checkpoints"):
            shutil.rmtree(work_dir_for(job.out), ignore_errors=True)  # as the train function does with its own
        raise_outcome(end, work=None if job.kind == "lab" else work_dir_for(job.out))

    def _take(self, job_id: str) -> Any:
        with self._lock:
            if self._idle:
                actor = self._idle.pop()
            else:
                options: dict[str, Any] = {"max_concurrency": 4, "max_restarts": 0, "max_task_retries": 0}
                if self._gpus:
                    options["num_gpus"] = 1
                else:
                    options["num_cpus"] = self.cpus_per_job
                actor = self._actor_cls.options(**options).remote(*self._arguments)
            self._busy[job_id] = actor
            return actor

    def _give_back(self, job_id: str, actor: Any, healthy: bool) -> None:
        """An actor that saw its job to the end waits for the next; any other is ended (it may be mid-job)."""
        with self._lock:
            self._busy.pop(job_id, None)
            self._placed.pop(job_id, None)
            if healthy and not self._closing:
                self._idle.append(actor)
                return
        self._kill(actor)

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def _ready(self, actor: Any, cancel: CancelToken) -> dict[str, Any]:
        """Wait for the actor to come up (Ray may be waiting for a GPU to be free); a cancel stops the wait."""
        reference = actor.info.remote()
        while True:
            ready, _ = self._ray.wait([reference], timeout=0.5)
            if ready:
                return self._ray.get(reference)
            if cancel.cancelled:
                raise TrainingCancelled("cancelled while it waited for a worker")

    def _send(self, actor: Any, job: Assignment) -> None:
        """The job's values and image, and the checkpoint a resume continues from; then start it."""
        ray = self._ray
        values = {key: str(value) if isinstance(value, Path) else value for key, value in job.values.items()}
        assignment = {"kind": job.kind, "method": job.method, "model": job.model, "values": values}
        if job.kind != "lab":
            # A recipe registered outside the built-ins is found on the worker by the module that registers it.
            assignment["recipe_module"] = recipe_for(job.method).module
        image = Path(job.values["image"]).read_bytes() if job.kind != "lab" else None
        ray.get(actor.open.remote(job.job_id, assignment, image), timeout=POLL_TIMEOUT_S)
        if job.kind != "lab":
            work = work_dir_for(job.out)
            checkpoint = latest_checkpoint(work)
            if job.values.get("restart"):
                shutil.rmtree(work, ignore_errors=True)  # the train function starts over on its side too
            elif job.values.get("resume") and checkpoint is not None:
                verify_checkpoint(checkpoint)  # a damaged one is named here, with the server's path
                run_file = work / "job.json"
                events = chain([("run-file", run_file.read_bytes())] if run_file.is_file() else [],
                               send_folder("checkpoint", checkpoint.name, checkpoint))
                for batch in batches(events, POLL_BYTES):
                    ray.get(actor.receive.remote(job.job_id, batch), timeout=POLL_TIMEOUT_S)
        ray.get(actor.start.remote(job.job_id), timeout=POLL_TIMEOUT_S)

    def _receiver(self, job: Assignment) -> Receiver:
        """Where what the worker sends goes: the places the in-process worker writes to, from the job's record."""
        if job.kind == "lab":
            return Receiver({"result": Area(lambda _: job.result, RESULT_SUFFIXES)})
        work = work_dir_for(job.out)
        return Receiver({
            "checkpoint": Area(lambda name: work / name, CHECKPOINT_SUFFIXES, CHECKPOINT_NAME_RE,
                               on_commit=_drop_older_checkpoints),
            "package": Area(lambda _: job.out, PACKAGE_SUFFIXES, replace=False),
        }, run_file=work / "job.json")

    def _follow(self, actor: Any, job: Assignment, reports: Reports, cancel: CancelToken) -> tuple:
        """Poll the worker until the job ends, passing on its reports and writing the files it sends."""
        from pipelines.images import load_image

        receiver = self._receiver(job)
        try:
            while True:
                events = self._ray.get(actor.poll.remote(job.job_id, cancel.cancelled, POLL_WAIT_S, POLL_BYTES),
                                       timeout=POLL_TIMEOUT_S)
                for event in events if isinstance(events, list) else [("?",)]:
                    kind = event[0] if isinstance(event, tuple) and event else None
                    if kind == "end":
                        return event[1:]
                    if kind == "progress" and len(event) == 2:
                        reports.progress(_progress_event(event[1]))
                    elif kind == "sample" and len(event) == 3 and type(event[1]) is int and isinstance(event[2], bytes):
                        reports.sample(event[1], load_image(event[2], min_side=1))
                    elif kind == "lab" and len(event) == 3:
                        reports.lab_progress(min(max(float(event[1]), 0.0), 1.0), str(event[2])[:200])
                    else:
                        receiver.apply(event)
        finally:
            receiver.discard()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            actors = self._idle + list(self._busy.values())
            self._idle.clear()
        for actor in actors:
            self._kill(actor)
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
