"""The shared loop: resume equals an uninterrupted run, cancel keeps a checkpoint, files are safe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipelines.package import AdapterPackage
from pipelines.training import CancelToken, TrainingCancelled, latest_checkpoint, work_dir_for
from tests.conftest import train_tiny


def _weights(package) -> dict[str, torch.Tensor]:
    return AdapterPackage.open(package).state_dict("full")


def test_resume_after_cancel_equals_an_uninterrupted_run(tmp_path):
    straight = train_tiny(tmp_path / "straight", steps=12, samples=False, checkpoint_every=4)

    cancel = CancelToken()

    def stop_at_7(event):
        if event.step == 7:
            cancel.cancel()

    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "resumed", model="tiny-sdxl", steps=12, rank=4,
                           learning_rate=1e-3, checkpoint_every=4, samples=False)
    with pytest.raises(TrainingCancelled):
        train_blora(request, on_progress=stop_at_7, cancel=cancel)
    work = work_dir_for(tmp_path / "resumed")
    checkpoint = latest_checkpoint(work)
    assert checkpoint is not None and checkpoint.name == "checkpoint-000007"  # cancel saved the last step
    assert not (tmp_path / "resumed").exists()  # no package from a cancelled run

    request.resume = True
    resumed = train_blora(request)
    a, b = _weights(straight), _weights(resumed)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not work.exists()  # the finished run cleans up its checkpoints


def test_existing_unfinished_run_needs_resume_or_restart(tmp_path):
    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", steps=6, rank=4,
                           checkpoint_every=2, samples=False)

    def cancel_at_3(event):
        if event.step == 3:
            cancel.cancel()

    cancel = CancelToken()
    with pytest.raises(TrainingCancelled):
        train_blora(request, on_progress=cancel_at_3, cancel=cancel)
    with pytest.raises(ValueError, match="--resume"):
        train_blora(request)
    other = TrainRequest(**{**request.__dict__, "image": EXAMPLES / "coffee.jpg", "resume": True})
    with pytest.raises(ValueError, match="image_sha256"):
        train_blora(other)
    request.restart = True
    assert train_blora(request).is_dir()


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    cancel = CancelToken()

    def stop(event):
        if event.step == 4:
            cancel.cancel()

    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", steps=8, rank=4,
                           checkpoint_every=2, samples=False)
    with pytest.raises(TrainingCancelled):
        train_blora(request, on_progress=stop, cancel=cancel)
    checkpoint = latest_checkpoint(work_dir_for(tmp_path / "p"))
    suffixes = {p.suffix for p in checkpoint.iterdir()}
    assert suffixes <= {".safetensors", ".json"}
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    assert any(k.endswith("exp_avg") for k in optimizer)


def test_cancelled_retrain_leaves_the_previous_package_intact(cat_package, tmp_path):
    import shutil

    target = tmp_path / "cat"
    shutil.copytree(cat_package, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    cancel = CancelToken()

    def stop(event):
        if event.step == 2:
            cancel.cancel()

    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    with pytest.raises(TrainingCancelled):
        train_blora(TrainRequest(image=EXAMPLES / "coffee.jpg", out=target, model="tiny-sdxl", steps=5, rank=4,
                                 force=True),
                    on_progress=stop, cancel=cancel)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    from pipelines.storage import atomic_dir

    target = tmp_path / "pkg"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "a.txt").write_text("new")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    with atomic_dir(target) as staging:
        (staging / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_progress_events_report_step_rate_and_eta(tmp_path):
    events = []
    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    train_blora(TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", steps=5, rank=4,
                             samples=False), on_progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    assert all(e.total_steps == 5 and e.steps_per_s > 0 and e.loss > 0 for e in events)
    assert events[-1].eta_s == 0


def test_reported_speed_counts_the_time_previews_take(tmp_path):
    """A preview belongs to its step's time, also on the first step of a run (or of a resumed one)."""
    import time

    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    events = []
    train_blora(TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", steps=3, rank=4,
                             sample_every=1, sample_steps=1, samples=False),
                on_progress=events.append, on_sample=lambda step, image: time.sleep(0.5))
    assert [e.step for e in events] == [1, 2, 3]
    assert all(0 < e.steps_per_s <= 2.0 for e in events)  # each step took at least its 0.5 s preview


def test_same_seed_same_adapter_and_other_seed_another(tmp_path):
    a = _weights(train_tiny(tmp_path / "a", steps=2, samples=False))
    b = _weights(train_tiny(tmp_path / "b", steps=2, samples=False))
    c = _weights(train_tiny(tmp_path / "c", steps=2, samples=False, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_gpu_memory_options_run_the_same_code_path_on_cpu(tmp_path):
    """bf16 mixed precision and gradient checkpointing (the GPU defaults), with previews, on a CPU."""
    previews = []
    from pipelines.blora import TrainRequest, train_blora
    from tests.conftest import EXAMPLES

    package = train_blora(
        TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", steps=4, rank=4,
                     mixed_precision="bf16", gradient_checkpointing=True, sample_every=2, sample_steps=2),
        on_sample=lambda step, image: previews.append((step, image.size)),
    )
    assert previews == [(2, (64, 64)), (4, (64, 64))]
    weights = _weights(package)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not left at zero
