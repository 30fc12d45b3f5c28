"""Training on ZeroGPU: chunks of steps, each a GPU call that resumes; the result is one uninterrupted run's."""

from __future__ import annotations

import multiprocessing
import pickle
import time

import pytest
import torch

from pipelines.package import AdapterPackage
from pipelines.training import CancelToken, TrainingCancelled, TrainingPaused, latest_checkpoint, work_dir_for
from tests.conftest import EXAMPLES


def _weights(package) -> dict[str, torch.Tensor]:
    return AdapterPackage.open(package).state_dict("full")


def _same(a, b) -> bool:
    a, b = _weights(a), _weights(b)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _request(out, **extra):
    from pipelines.blora import TrainRequest

    return TrainRequest(image=EXAMPLES / "cat.jpg", out=out, model="tiny-sdxl", steps=6, rank=4,
                        learning_rate=1e-3, checkpoint_every=4, samples=False, **extra)


def test_training_in_chunks_equals_one_uninterrupted_run(tmp_path):
    from pipelines.blora import train_blora

    straight = train_blora(_request(tmp_path / "straight"))
    request = _request(tmp_path / "chunked", max_steps_this_call=2)
    paused_at = []
    while True:
        try:
            chunked = train_blora(request)
            break
        except TrainingPaused as exc:
            paused_at.append(exc.step)
            assert latest_checkpoint(work_dir_for(request.out)).name == f"checkpoint-{exc.step:06d}"
            request.resume = True
    assert paused_at == [2, 4]
    assert _same(straight, chunked)


def test_spaces_gpu_is_the_function_itself_off_zerogpu(monkeypatch):
    spaces = pytest.importorskip("spaces")
    from studio.zerogpu import ChunkedRunner, gpu_chunk

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert spaces.GPU(duration=30)(gpu_chunk) is gpu_chunk
    assert ChunkedRunner(chunk_steps=10, duration_s=30).call is gpu_chunk


def test_jobs_train_in_chunks_taking_turns_with_other_users(tmp_path):
    from pipelines.blora import TrainRequest, train_blora
    from studio.jobs import JobManager, run_training
    from studio.workspace import new_workspace_id
    from studio.zerogpu import ChunkedRunner

    calls = []

    def recording(method, request, **callbacks):
        calls.append((request.out.name, request.max_steps_this_call))
        return run_training(method, request, **callbacks)

    manager = JobManager(tmp_path / "home", runner=ChunkedRunner(chunk_steps=2, duration_s=60, runner=recording),
                         start=False)
    owners = [new_workspace_id(manager.home), new_workspace_id(manager.home)]
    jobs = [manager.submit(owner, image=EXAMPLES / "cat.jpg", method="b-lora", model="tiny-sdxl", name=name,
                           steps=4, rank=4, learning_rate=1e-3, sample_steps=1)
            for owner, name in zip(owners, ("first", "second"), strict=True)]
    manager._thread.start()
    try:
        done = [manager.wait(owner, job.id, timeout=600) for owner, job in zip(owners, jobs, strict=True)]
    finally:
        manager.close()
    assert [c[0] for c in calls] == ["first", "second", "first", "second"]
    assert all(steps == 2 for _, steps in calls)
    for record in done:
        assert record.status == "done" and record.step == record.total == 4
        assert len(record.losses) == 4 and record.resumed_from is None and record.runs == 2
    package = tmp_path / "home" / "workspaces" / owners[0] / "packages" / "first"
    straight = train_blora(TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "straight", model="tiny-sdxl",
                                        steps=4, rank=4, learning_rate=1e-3, samples=False))
    assert _same(straight, package)


def forked_gpu(fn=None, *, duration=None):
    """What `spaces.GPU` does on ZeroGPU, minus the GPU: the function runs in a forked process, its arguments
    and every item it yields cross over pickled, and nothing else it changes comes back."""

    def wrap(func):
        def call(*args):
            context = multiprocessing.get_context("fork")
            items = context.Queue()

            def child():
                try:
                    for item in func(*pickle.loads(pickle.dumps(args))):
                        items.put(pickle.dumps(item))
                finally:
                    items.put(None)

            process = context.Process(target=child, daemon=True)
            process.start()
            while (item := items.get()) is not None:
                yield pickle.loads(item)
            process.join()

        return call

    return wrap(fn) if fn is not None else wrap


def test_a_chunk_in_another_process_reports_progress_and_obeys_cancel(tmp_path, monkeypatch):
    import studio.zerogpu as zerogpu
    from pipelines.models import load_pipeline
    from studio.methods import METHODS

    monkeypatch.setattr(zerogpu, "gpu", forked_gpu)
    runner = zerogpu.ChunkedRunner(chunk_steps=3, duration_s=60)
    pipe = load_pipeline("tiny-sdxl")
    method = METHODS["b-lora"]
    cancel = CancelToken()
    steps = []

    def progress(event):
        steps.append(event.step)
        if event.step == 2:
            cancel.cancel()

    request = _request(tmp_path / "forked")
    started = time.monotonic()
    with pytest.raises(TrainingCancelled):
        runner(method, request, on_progress=progress, cancel=cancel, pipe=pipe)
    assert steps[:2] == [1, 2] and len(steps) <= 3  # cancel reached the other process within a step
    assert latest_checkpoint(work_dir_for(request.out)) is not None
    assert not (work_dir_for(request.out) / zerogpu.CANCEL_FILE).exists()

    stopped = steps[-1]
    request = _request(tmp_path / "forked", resume=True, max_steps_this_call=1)
    with pytest.raises(TrainingPaused) as paused:
        runner(method, request, on_progress=lambda e: steps.append(e.step), pipe=pipe)
    assert paused.value.step == steps[-1] == stopped + 1  # resumed from the checkpoint the cancel wrote
    assert time.monotonic() - started < 300
