"""Training on a ZeroGPU Space: in chunks of steps, each chunk one `@spaces.GPU` call that resumes from the
last checkpoint.

On ZeroGPU a GPU is attached only while a decorated function runs, for at most its `duration`, and the
function runs in a forked worker process: its arguments and what it yields are pickled across, and nothing
else it changes comes back. So a chunk is a generator, `gpu_chunk`, that trains `chunk_steps` steps (the loop's
`max_steps_this_call`, which checkpoints and raises `TrainingPaused`) and yields its progress events, previews
and outcome (`studio.workers.outcome_event`); `ChunkedRunner` calls it from the jobs worker and turns the events back into the callbacks a
runner gets. The worker puts a paused job at the back of the queue, so other users' jobs run between its
chunks, and the next chunk resumes from the checkpoint: the result is bit-identical to one uninterrupted run.
Cancelling crosses the process boundary as a file in the run's work folder. The base pipeline is loaded in the
main process (ZeroGPU moves it to the GPU for each call) and reaches the worker through `_CALLS`, never pickled.

Off ZeroGPU `spaces.GPU` returns the function unchanged, so the same code trains in-process in chunks (the
tests run it so); without the `spaces` package `studio.gpu.gpu` is a no-op.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.training import CancelToken, work_dir_for
from studio.gpu import gpu
from studio.workers import outcome_event, raise_outcome

DEFAULT_CHUNK_STEPS = 100
DEFAULT_DURATION_S = 120
CANCEL_FILE = "cancel-requested"

# call id -> (runner, pipe) for the chunk running now: the worker process inherits it with the fork.
_CALLS: dict[int, tuple[Any, Any]] = {}
_ids = itertools.count(1)


class FileCancelToken(CancelToken):
    """A cancel token another process can see: cancelled once its file exists."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def cancel(self) -> None:
        super().cancel()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or self.path.exists()


def _events(call_id: int, method: Any, request: Any) -> Iterator[tuple]:
    """Run one chunk on a thread of this process and relay its callbacks as events, then its outcome."""
    runner, pipe = _CALLS[call_id]
    events: queue.Queue = queue.Queue()
    token = FileCancelToken(work_dir_for(request.out) / CANCEL_FILE)

    def work() -> None:
        try:
            runner(method, request, on_progress=lambda e: events.put(("progress", e)),
                   on_sample=lambda step, image: events.put(("sample", step, image)), cancel=token, pipe=pipe)
            outcome = outcome_event(None)
        except Exception as exc:  # its outcome crosses the process boundary as plain values, not the object
            outcome = outcome_event(exc, work=work_dir_for(request.out))
        events.put(("end", *outcome))

    thread = threading.Thread(target=work, name="blockstudio-chunk", daemon=True)
    thread.start()
    while True:
        event = events.get()
        yield event
        if event[0] == "end":
            break
    thread.join()


class ChunkedRunner:
    """A jobs runner that trains through GPU calls of `chunk_steps` steps each (`JobManager(runner=...)`).

    `duration_s` is what each call asks ZeroGPU for; pick `chunk_steps` so that loading the adapters, caching
    the image and the prompts and that many steps fit in it (README: "Training on a ZeroGPU Space").
    """

    def __init__(self, chunk_steps: int = DEFAULT_CHUNK_STEPS, duration_s: int = DEFAULT_DURATION_S,
                 runner: Any = None) -> None:
        from studio.jobs import run_training

        if chunk_steps < 1 or duration_s < 1:
            raise ValueError("a chunk needs at least one step and one second")
        self.chunk_steps = chunk_steps
        self.duration_s = duration_s
        self.runner = runner or run_training
        self.call = gpu(duration=duration_s)(gpu_chunk)

    @classmethod
    def from_environment(cls) -> ChunkedRunner:
        """Chunk size and GPU duration from BLOCKSTUDIO_CHUNK_STEPS and BLOCKSTUDIO_GPU_DURATION."""
        return cls(int(os.environ.get("BLOCKSTUDIO_CHUNK_STEPS", DEFAULT_CHUNK_STEPS)),
                   int(os.environ.get("BLOCKSTUDIO_GPU_DURATION", DEFAULT_DURATION_S)))

    def __call__(self, method: Any, request: Any, *, on_progress=None, on_sample=None, cancel=None, pipe=None) -> Path:
        request.max_steps_this_call = request.max_steps_this_call or self.chunk_steps
        request.compile_blocks = False  # ZeroGPU runs no torch.compile (ahead-of-time compilation only)
        cancel_file = work_dir_for(request.out) / CANCEL_FILE
        cancel_file.unlink(missing_ok=True)
        call_id = next(_ids)
        _CALLS[call_id] = (self.runner, pipe)
        try:
            for event in self.call(call_id, method, request):
                if cancel is not None and cancel.cancelled and not cancel_file.exists():
                    cancel_file.parent.mkdir(parents=True, exist_ok=True)
                    cancel_file.touch()
                kind = event[0]
                if kind == "progress" and on_progress is not None:
                    on_progress(event[1])
                elif kind == "sample" and on_sample is not None:
                    on_sample(event[1], event[2])
                elif kind == "end":
                    raise_outcome(event[1:], work=work_dir_for(request.out))
                    return Path(request.out)
        finally:
            _CALLS.pop(call_id, None)
            cancel_file.unlink(missing_ok=True)
        raise RuntimeError("the GPU call ended without an outcome")


def gpu_chunk(call_id: int, method: Any, request: Any) -> Iterator[tuple]:
    """One GPU call: train up to `request.max_steps_this_call` steps, yielding events (see `_events`)."""
    yield from _events(call_id, method, request)
