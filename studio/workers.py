"""Where jobs run: the worker protocol, and the in-process worker (the default: nothing to start).

The job service (`studio.jobs.JobManager`) keeps the records and the queue; a worker only runs what it is given.
It gets an `Assignment` (one run of one job: its kind, method key, request values, and where the server keeps
the job's files), reports through `Reports` (progress, previews, lab progress, where it runs) and ends the way
the train function does: it returns, or raises `TrainingPaused`, `TrainingCancelled`, `CorruptCheckpoint`, a
`BlockStudioError` for the user's input, any other error for a failure, or `WorkerLost` when the process or
machine running the job went away (the job is then interrupted and resumes from its last checkpoint).

Two backends: `InProcessWorker` trains in the server's own process, one job at a time, with a warm pipeline;
`studio.ray_worker.RayWorker` sends each job to a Ray cluster, one job per GPU (`BLOCKSTUDIO_RAY_ADDRESS`).
Both call the same function to train (`studio.jobs.run_training`, through the method's request) and to run a
lab experiment (`pipelines.lab.run_experiment`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipelines.errors import BlockStudioError, explain
from pipelines.training import CancelToken, CorruptCheckpoint, TrainingCancelled, TrainingPaused

log = logging.getLogger(__name__)


@dataclass
class Assignment:
    """One run of one job, as a worker gets it: what to run, and where the server keeps the job's files."""

    job_id: str
    kind: str  # "training" or "lab"
    method: str  # training: a studio method key (`studio.methods.METHODS`); lab: an adapter-lab method
    model: str
    # training: the values of the method's request (`Method.build_request`), `image` and `out` the server's paths;
    # lab: the experiment's settings
    values: dict[str, Any]
    result: Path | None = None  # lab: the folder its result goes to

    @property
    def out(self) -> Path:
        return Path(self.values["out"])


def _ignore(*_: Any) -> None:
    pass


@dataclass
class Reports:
    """Where a worker's reports go: the callbacks the train function and the lab get, and where the job runs."""

    progress: Callable[[Any], None] = _ignore  # a `pipelines.training.ProgressEvent` per step
    sample: Callable[[int, Any], None] = _ignore  # (step, PIL image): a preview
    lab_progress: Callable[[float, str], None] = _ignore  # (fraction done, message)
    placed: Callable[[dict[str, Any]], None] = _ignore  # where the job runs: {"backend", "node", "pid", ...}


@dataclass(frozen=True)
class WorkerFacts:
    """What an operator wants to know about the workers: which backend, how many jobs at once, workers and GPUs."""

    backend: str  # "in-process" or "ray"
    slots: int  # jobs that may run at once (one per GPU)
    workers: int  # worker processes up now
    gpus: int  # GPUs the jobs train on
    address: str | None = None  # the Ray cluster's address (for operators; the page does not show it)
    detail: str = ""  # e.g. "ZeroGPU, in chunks of 100 steps"


class Worker(Protocol):
    """A backend that runs jobs. `run` blocks until the job's run ends; up to `facts().slots` runs at once.

    `facts()` answers at once from what the worker knows (the page asks every second); `refresh()` may ask a
    cluster and is called now and then by the job service's dispatcher.
    """

    backend: str

    def facts(self) -> WorkerFacts: ...

    def refresh(self) -> None: ...

    def run(self, job: Assignment, reports: Reports, cancel: CancelToken) -> None: ...

    def close(self) -> None: ...


class WorkerLost(Exception):
    """The process or machine running a job went away; the job is interrupted and resumes from its checkpoint."""


class RemoteFailure(Exception):
    """A job failed in another process; the message is the one line its record shows (made where it failed)."""


def failure_line(exc: BaseException, what: str) -> str:
    from studio.jobs import failure_message

    return failure_message(exc, what)


# -- outcomes across a process boundary ------------------------------------------------------------------


def outcome_event(exc: BaseException | None, *, what: str = "training", work: Path | None = None,
                  scrub: Callable[[str], str] = str) -> tuple:
    """How a run ended, as plain values another process can rebuild with `raise_outcome`.

    A failure travels as the one line its record will show, made here, where the exception (and its errno, for
    a full disk) is; a damaged checkpoint as its path inside the run's work folder `work`.
    """
    if exc is None:
        return ("done",)
    if isinstance(exc, TrainingPaused):
        return ("paused", exc.step, exc.total)
    if isinstance(exc, TrainingCancelled):
        return ("cancelled", scrub(str(exc)))
    if isinstance(exc, CorruptCheckpoint) and work is not None and exc.path is not None:
        try:
            return ("corrupt", scrub(str(exc)), exc.path.relative_to(work).as_posix())
        except ValueError:
            pass
    if isinstance(exc, BlockStudioError):
        return ("refused", scrub(str(exc)))
    if not isinstance(exc, Exception):
        raise exc  # KeyboardInterrupt, SystemExit: not a job's outcome
    if explain(exc) is None:  # unexpected: the traceback goes to the log of the process it happened in
        log.error("%s failed", what, exc_info=exc)
    return ("failed", scrub(failure_line(exc, what)))


def raise_outcome(event: tuple, *, work: Path | None = None) -> None:
    """Return for a run that is done; raise what ended any other (the exceptions the train function raises)."""
    from studio.streaming import check_relative

    kind, args = event[0], event[1:]
    if kind == "done":
        return
    if kind == "paused":
        raise TrainingPaused(int(args[0]), int(args[1]))
    if kind == "cancelled":
        raise TrainingCancelled(str(args[0]))
    if kind == "corrupt" and work is not None:
        path = work / check_relative(args[1])
        raise CorruptCheckpoint(f"the checkpoint {path} is damaged; start over with --restart", path)
    if kind in ("refused", "corrupt"):
        raise BlockStudioError(str(args[0]))
    if kind == "failed":
        raise RemoteFailure(str(args[0]))
    raise RemoteFailure(f"the worker ended the job in a way this server does not know ({str(kind)[:40]!r})")


# -- the in-process worker -------------------------------------------------------------------------------


def load_pipeline(model: str):
    from pipelines.models import load_pipeline as load

    return load(model)


def run_lab_experiment(method: str, settings: dict[str, Any], progress: Any):
    from pipelines.lab import run_experiment

    return run_experiment(method, settings, progress)


@dataclass
class InProcessWorker:
    """Runs jobs in this process, one at a time, keeping the last base pipeline warm for the next job.

    `runner` is the train function's stand-in (`studio.jobs.run_training` by default; `ChunkedRunner` on ZeroGPU),
    `lab_runner` the lab's (`run_experiment`), and `load` loads a base pipeline.
    """

    runner: Callable[..., Any] | None = None
    lab_runner: Callable[..., Any] = run_lab_experiment
    load: Callable[[str], Any] = load_pipeline
    backend: str = "in-process"
    _pipes: dict[str, Any] = field(default_factory=dict)

    def facts(self) -> WorkerFacts:
        from studio.gpu import on_zero_gpu

        detail = ""
        chunk = getattr(self.runner, "chunk_steps", None)
        if on_zero_gpu():
            detail = f"ZeroGPU, in chunks of {chunk} steps" if chunk else "ZeroGPU"
        return WorkerFacts(self.backend, slots=1, workers=1, gpus=1 if detail or _has_cuda() else 0, detail=detail)

    def refresh(self) -> None:
        pass

    def pipeline(self, model: str):
        # One warm training pipeline: loading SDXL or Flux again for every job would cost far more than a step.
        if model not in self._pipes:
            self._pipes.clear()
            self._pipes[model] = self.load(model)
        return self._pipes[model]

    def run(self, job: Assignment, reports: Reports, cancel: CancelToken) -> None:
        reports.placed({"backend": self.backend, "pid": os.getpid()})
        if job.kind == "lab":
            from pipelines.lab import Progress

            result = self.lab_runner(job.method, job.values, Progress(reports.lab_progress, cancel))
            result.save(job.result)
            return
        from studio.jobs import run_training
        from studio.methods import method_for

        method = method_for(job.method)
        request = method.build_request(**job.values)
        pipe = self.pipeline(job.model)
        try:
            (self.runner or run_training)(method, request, on_progress=reports.progress, on_sample=reports.sample,
                                          cancel=cancel, pipe=pipe)
        finally:
            try:
                # A stopped run leaves its training adapter in the model; the next job needs the bare base.
                pipe.unload_lora_weights()
            except Exception:
                self._pipes.clear()

    def close(self) -> None:
        self._pipes.clear()


@functools.cache
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- choosing a backend ----------------------------------------------------------------------------------


def worker_from_environment(runner: Callable[..., Any] | None = None) -> Worker | None:
    """The Ray backend when `BLOCKSTUDIO_RAY_ADDRESS` is set (`auto` or `ray://host:port`), else None.

    `BLOCKSTUDIO_RAY_WORKERS` sets how many jobs run at once (default: one per GPU of the cluster, one without).
    A bad value, or the variable set without Ray installed, stops the server with one line saying what to do.
    """
    address = os.environ.get("BLOCKSTUDIO_RAY_ADDRESS", "")
    if not address:
        return None
    from studio.ray_worker import RayWorker, check_address, check_workers

    return RayWorker(check_address(address), workers=check_workers(os.environ.get("BLOCKSTUDIO_RAY_WORKERS")),
                     runner=runner)
