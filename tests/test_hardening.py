"""Hostile input and hostile conditions, off the web: folders that must not be wiped, names that must not be
taken twice, zips and links that must not be followed, numbers that must not be trained on, a full disk, and
model loads racing each other."""

from __future__ import annotations

import errno
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import BlockStudioError, InvalidAdapter
from studio.cli import EXIT_BAD_INPUT, main
from studio.library import Library, LibraryError
from studio.workspace import Workspace, new_workspace_id
from tests.conftest import EXAMPLES

TRAIN = ["train", "blora", "--model", "tiny-sdxl", "--steps", "2", "--rank", "4", "--sample-steps", "1"]


def _one_line_refusal(rc: int, capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_BAD_INPUT, err
    assert err.startswith("blockstudio: error:") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- --out never wipes what the user did not ask to replace ---------------------------------------------


@pytest.mark.parametrize("command", ["train", "import"])
def test_out_keeps_a_folder_of_other_files(command, tmp_path, capsys, cat_package):
    out = tmp_path / "d"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    (out / "notes" / "a.md").write_text("more")
    before = _tree(out)
    args = ([*TRAIN, "--image", str(EXAMPLES / "cat.jpg")] if command == "train"
            else ["import", str(cat_package / "pytorch_lora_weights.safetensors"), "--model", "tiny-sdxl"])
    rc = main([*args, "--out", str(out)])
    _one_line_refusal(rc, capsys, "not an adapter package", "--force")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_out_replaces_a_package_only_when_asked(tmp_path, capsys, cat_package):
    import shutil

    out = tmp_path / "cat"
    shutil.copytree(cat_package, out)
    before = _tree(out)
    weights = str(cat_package / "pytorch_lora_weights.safetensors")
    rc = main(["import", weights, "--model", "tiny-sdxl", "--token", "[v9]", "--out", str(out)])
    _one_line_refusal(rc, capsys, "existing adapter package", "--force")
    assert _tree(out) == before
    assert main(["import", weights, "--model", "tiny-sdxl", "--token", "[v9]", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "adapter.json").read_text())["token"] == "[v9]"


def test_a_folder_holding_packages_is_never_replaced_even_with_force(tmp_path, capsys, cat_package):
    import shutil

    library = tmp_path / "adapters"
    shutil.copytree(cat_package, library / "cat")
    (library / "list.txt").write_text("mine")
    before = _tree(library)
    rc = main(["import", str(cat_package / "pytorch_lora_weights.safetensors"), "--model", "tiny-sdxl",
               "--out", str(library), "--force"])
    _one_line_refusal(rc, capsys, "never replaced", "holds adapter packages")
    assert _tree(library) == before


def test_a_partial_folder_that_is_not_a_run_is_left_alone(tmp_path, capsys):
    partial = tmp_path / "cat.partial"
    partial.mkdir()
    (partial / "draft.txt").write_text("mine")
    rc = main([*TRAIN, "--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "cat")])
    _one_line_refusal(rc, capsys, "cat.partial", "not an unfinished Block Studio run")
    assert (partial / "draft.txt").read_text() == "mine"


def test_generate_does_not_overwrite_an_image_unless_asked(tmp_path, capsys, cat_package):
    out = tmp_path / "mix.png"
    out.write_bytes(b"an earlier picture")
    rc = main(["generate", "--content", str(cat_package), "--steps", "1", "--out", str(out)])
    _one_line_refusal(rc, capsys, "already exists", "--force")
    assert out.read_bytes() == b"an earlier picture"
    assert main(["generate", "--content", str(cat_package), "--steps", "1", "--out", str(out), "--force"]) == 0
    assert Image.open(out).size == (64, 64)


# -- numbers that are not settings ----------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "word"), [
    ("--lr", "inf", "learning rate"),
    ("--lr", "nan", "learning rate"),
    ("--lr", "1e30", "learning rate"),
    ("--seed", str(2**80), "seed"),
    ("--steps", "0", "steps"),
    ("--checkpoint-every", "-1", "checkpoint interval"),
    ("--token", "v42\n", "token"),
])
def test_training_refuses_bad_settings_in_one_line(option, value, word, tmp_path, capsys):
    rc = main([*TRAIN, "--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "cat"), option, value])
    _one_line_refusal(rc, capsys, word)
    assert list(tmp_path.iterdir()) == []


def test_8bit_adam_without_a_gpu_is_one_line(tmp_path, capsys):
    rc = main([*TRAIN, "--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "cat"), "--use-8bit-adam"])
    _one_line_refusal(rc, capsys, "8-bit Adam", "CUDA")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "word"), [
    (["--num-images", "0"], "number of images"),
    (["--content-scale", "nan"], "content scale"),
    (["--style-scale", "inf"], "style scale"),
    (["--guidance", "nan"], "guidance"),
    (["--steps", "0"], "steps"),
    (["--seed", str(2**80)], "seed"),
])
def test_generate_refuses_bad_numbers_in_one_line(args, word, tmp_path, capsys, cat_package):
    rc = main(["generate", "--content", str(cat_package), "--style", str(cat_package), *args,
               "--out", str(tmp_path / "x.png")])
    _one_line_refusal(rc, capsys, word)
    assert list(tmp_path.iterdir()) == []


def test_resume_over_a_truncated_checkpoint_names_the_file_and_offers_restart(tmp_path, capsys):
    from pipelines.training import CancelToken, TrainingCancelled

    out = tmp_path / "cat"
    cancel = CancelToken()
    from pipelines.blora import TrainRequest, train_blora

    with pytest.raises(TrainingCancelled):
        train_blora(TrainRequest(image=EXAMPLES / "cat.jpg", out=out, model="tiny-sdxl", steps=4, rank=4,
                                 checkpoint_every=0, samples=False),
                    on_progress=lambda event: cancel.cancel(), cancel=cancel)
    damaged = next((tmp_path / "cat.partial").glob("checkpoint-*")) / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    rc = main([*TRAIN, "--image", str(EXAMPLES / "cat.jpg"), "--out", str(out), "--steps", "4", "--resume"])
    _one_line_refusal(rc, capsys, "optimizer.safetensors", "--restart")
    assert main([*TRAIN, "--image", str(EXAMPLES / "cat.jpg"), "--out", str(out), "--restart"]) == 0


def _lora_file(path: Path, canonical: dict[str, torch.Tensor], change) -> Path:
    from pipelines import formats

    tensors = formats.to_kohya(canonical)
    change(tensors)
    save_file(tensors, str(path))
    return path


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize(("change", "word"), [
    (lambda t: t.__setitem__(_first(t, "lora_down.weight"), t[_first(t, "lora_down.weight")] * float("nan")),
     "NaN or infinite"),
    (lambda t: t.__setitem__(_first(t, "lora_up.weight"), torch.full_like(t[_first(t, "lora_up.weight")], float("inf"))),
     "NaN or infinite"),
    (lambda t: t.__setitem__(_first(t, "lora_down.weight"), t[_first(t, "lora_down.weight")] > 0), "bool"),
    (lambda t: t.__setitem__(_first(t, "lora_down.weight"), t[_first(t, "lora_down.weight")].to(torch.int8)), "int8"),
    (lambda t: t.__setitem__(_first(t, ".alpha"), torch.tensor(float("nan"))), "alpha"),
])
def test_import_refuses_broken_weights(change, word, cat_package, tmp_path, capsys):
    from pipelines.package import AdapterPackage

    canonical = AdapterPackage.open(cat_package).state_dict("full")
    source = _lora_file(tmp_path / "in.safetensors", canonical, change)
    rc = main(["import", str(source), "--model", "tiny-sdxl", "--out", str(tmp_path / "imported")])
    _one_line_refusal(rc, capsys, word)
    assert not (tmp_path / "imported").exists()


class _Diverging:
    """A one-parameter recipe whose loss or weights stop being finite at a chosen step."""

    def __init__(self, nan_loss_at: int | None = None) -> None:
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.module = torch.nn.Module()
        self.module.weight = self.weight
        self.nan_loss_at = nan_loss_at
        self.calls = 0

    def setup(self, accelerator, config) -> None:
        pass

    def trainable_module(self):
        return self.module

    def trainable_parameters(self):
        return [self.weight]

    def loss(self, generator):
        self.calls += 1
        loss = (self.weight ** 2).sum()
        if self.nan_loss_at == self.calls:
            loss = loss * float("nan")
        return loss, {}

    def adapter_state_dict(self):
        return {"w": self.weight.detach()}

    def load_adapter_state_dict(self, state):
        pass


def test_training_stops_with_a_clear_message_when_the_loss_or_the_weights_diverge(tmp_path):
    from pipelines.training import TrainConfig, TrainingDiverged, train

    config = TrainConfig(steps=5, learning_rate=1e-3, checkpoint_every=2, max_grad_norm=0)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*lower the learning rate"):
        train(_Diverging(nan_loss_at=3), config, tmp_path / "a")
    # Weights that blow up: a learning rate no check let through (the loop is the last line of defence).
    config = TrainConfig(steps=3, learning_rate=float("inf"), checkpoint_every=1, max_grad_norm=0, weight_decay=0)
    with pytest.raises(TrainingDiverged, match="weights became NaN or infinite"):
        train(_Diverging(), config, tmp_path / "b")
    assert not list((tmp_path / "b").glob("checkpoint-*"))  # nothing non-finite was checkpointed


def test_16_bit_and_float_images_keep_their_tones(tmp_path):
    from pipelines.images import load_image

    ramp = np.linspace(0.0, 1.0, 128 * 128).reshape(128, 128)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray((ramp * 4000 - 1000).astype(np.float32)).save(tmp_path / "hdr.tif")
    for name in ("gray16.png", "float.tif", "hdr.tif"):
        pixels = np.asarray(load_image(tmp_path / name), dtype=np.float64)
        assert abs(pixels.mean() - 127.5) < 1.0, name  # a ramp stays a ramp: not white, not black
        assert pixels.min() == 0 and pixels.max() == 255, name


def test_names_are_checked_whole_not_up_to_a_newline(tmp_path):
    from pipelines.package import check_name, check_token
    from studio.jobs import JobError, JobManager

    for check, value in ((check_token, "v42\n"), (check_name, "cat\n")):
        with pytest.raises(BlockStudioError):
            check(value)
    owner = new_workspace_id(tmp_path)
    with pytest.raises(BlockStudioError, match="workspace"):
        Workspace(owner + "\n", tmp_path)
    jobs = JobManager(tmp_path, start=False)
    with pytest.raises(JobError):
        jobs.get(owner, "20250101-000000-abcdef\n")


# -- the library: names, zips, links --------------------------------------------------------------------


def _library(tmp_path: Path) -> Library:
    return Library(Workspace(new_workspace_id(tmp_path), tmp_path), shared=tmp_path / "no-shared")


def _package_zip(source: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(source.rglob("*")):
            if file.is_file():
                archive.write(file, f"pkg/{file.relative_to(source).as_posix()}")
    return path


def test_two_imports_with_one_name_leave_one_package_and_one_refusal(tmp_path, cat_package, monkeypatch):
    import studio.library as library_module

    library = _library(tmp_path)
    upload = _package_zip(cat_package, tmp_path / "cat.zip")
    barrier = threading.Barrier(2)
    check = library_module._check_package_folder

    def slow_check(folder, label):  # both imports are inside their write at the same moment
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        check(folder, label)

    monkeypatch.setattr(library_module, "_check_package_folder", slow_check)
    results = []

    def run():
        try:
            results.append(library.import_file(upload, name="twin"))
        except LibraryError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(type, results), key=str) == sorted([str, LibraryError], key=str), results
    assert [s.name for s in library.list()] == ["twin"]


def test_a_queued_jobs_name_cannot_be_imported_or_renamed_into(tmp_path, cat_package):
    from studio.jobs import JobManager

    jobs = JobManager(tmp_path, start=False)  # the job waits in the queue
    owner = new_workspace_id(tmp_path)
    jobs.submit(owner, image=EXAMPLES / "cat.jpg", method="b-lora", model="tiny-sdxl", name="waiting", steps=2,
                rank=4, learning_rate=1e-4)
    library = Library(Workspace(owner, tmp_path), shared=tmp_path / "no-shared")
    with pytest.raises(LibraryError, match="already exists"):
        library.import_file(_package_zip(cat_package, tmp_path / "cat.zip"), name="waiting")
    assert library.import_file(tmp_path / "cat.zip", name="other") == "other"
    with pytest.raises(LibraryError, match="already exists"):
        library.rename("other", "waiting")
    assert library.unique_name("waiting") == "waiting-2"
    assert [s.name for s in library.list()] == ["other"]


def test_a_zip_bomb_is_refused_before_anything_is_extracted(tmp_path, monkeypatch):
    import studio.library as library_module

    library = _library(tmp_path)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/adapter.json", "{}")
        with archive.open("pkg/pytorch_lora_weights.safetensors", "w") as member:
            zeros = bytes(16 * 1024**2)
            for _ in range(8):  # 128 MB of zeros in about 130 kB
                member.write(zeros)
    assert bomb.stat().st_size < 1024**2
    extracted = []
    monkeypatch.setattr(library_module, "_extract_bounded", lambda *args: extracted.append(args))
    with pytest.raises(LibraryError, match="zip bomb"):
        library.import_file(bomb)
    assert extracted == []
    assert list(library.workspace.packages.iterdir()) == []


def test_a_zip_larger_than_any_package_is_refused_before_extraction(tmp_path, monkeypatch, cat_package):
    import studio.library as library_module

    library = _library(tmp_path)
    upload = _package_zip(cat_package, tmp_path / "cat.zip")
    size = sum(p.stat().st_size for p in cat_package.rglob("*") if p.is_file())
    monkeypatch.setattr(library_module, "MAX_PACKAGE_BYTES", size - 1)
    with pytest.raises(LibraryError, match="more than an adapter package needs"):
        library.import_file(upload)
    assert list(library.workspace.packages.iterdir()) == []


def test_links_inside_a_package_are_never_followed(tmp_path, cat_package):
    import shutil

    from studio.hub import HubError, push_package

    secret = tmp_path / "server-secret.png"
    Image.new("RGB", (64, 64), "red").save(secret)
    library = _library(tmp_path)
    folder = library.workspace.packages / "cat"
    shutil.copytree(cat_package, folder)
    (folder / "samples" / "input.png").unlink()
    (folder / "samples" / "full.png").unlink()
    os.symlink(secret, folder / "samples" / "input.png")
    os.symlink(secret, folder / "samples" / "full.png")
    os.symlink(secret, folder / "notes.png")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "private.txt").write_text("not for export")
    os.symlink(tmp_path / "outside", folder / "elsewhere")

    summary = library.list()[0]
    assert summary.thumbnail is None
    files = library.inspect("cat")["files"]
    assert "notes.png" not in files and "samples/input.png" not in files
    assert not any(name.startswith("elsewhere") for name in files)
    with zipfile.ZipFile(library.export_zip("cat")) as archive:
        names = archive.namelist()
        assert secret.read_bytes() not in [archive.read(n) for n in names]
    assert "cat/notes.png" not in names and not any("elsewhere" in n for n in names)
    with pytest.raises(HubError, match="links"):
        push_package(folder, "me/cat", token="hf_" + "x" * 20, endpoint="http://127.0.0.1:9")


# -- the training service under a full disk and a damaged checkpoint ------------------------------------


class _Runner:
    """Stands in for the training function: scripted outcomes per package name."""

    def __init__(self, script) -> None:
        self.script = script
        self.requests = []

    def __call__(self, method, request, *, on_progress, on_sample, cancel, pipe):
        self.requests.append(request)
        return self.script(request)


def _manager(tmp_path, runner, monkeypatch, **kwargs):
    from studio.jobs import JobManager

    jobs = JobManager(tmp_path, runner=runner, **kwargs)

    class NoPipe:
        def unload_lora_weights(self):
            pass

    monkeypatch.setattr(jobs, "_pipeline", lambda model: NoPipe())
    return jobs


SETTINGS = dict(method="b-lora", model="tiny-sdxl", steps=2, rank=4, learning_rate=1e-4)


def test_a_full_disk_fails_one_job_and_the_next_one_runs(tmp_path, monkeypatch):
    import studio.jobs as jobs_module

    def script(request):
        if Path(request.out).name == "first":
            raise OSError(errno.ENOSPC, "No space left on device", str(request.out))
        return Path(request.out)

    write_json = jobs_module.write_json
    failing = {"left": 2}

    def full_then_free(path, data):  # the disk is also full for the first record writes of the first job
        if data.get("name") == "first" and data.get("status") == "running" and failing["left"]:
            failing["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_json(path, data)

    monkeypatch.setattr(jobs_module, "write_json", full_then_free)
    runner = _Runner(script)
    jobs = _manager(tmp_path, runner, monkeypatch)
    owner = new_workspace_id(tmp_path)
    try:
        first = jobs.submit(owner, image=EXAMPLES / "cat.jpg", name="first", **SETTINGS)
        second = jobs.submit(owner, image=EXAMPLES / "coffee.jpg", name="second", **SETTINGS)
        assert jobs.wait(owner, second.id, timeout=30).status == "done"
        failed = jobs.get(owner, first.id)
        assert failed.status == "failed" and "disk" in failed.error and "full" in failed.error
        assert jobs._thread.is_alive()
        on_disk = json.loads((tmp_path / "workspaces" / owner / "jobs" / first.id / "job.json").read_text())
        assert on_disk["status"] == "failed"
    finally:
        jobs.close()


def test_a_damaged_checkpoint_is_named_and_the_job_starts_over(tmp_path, monkeypatch):
    from pipelines.training import TrainingCancelled

    def script(request):
        if not request.restart:
            checkpoint = Path(f"{request.out}.partial") / "checkpoint-000002"
            checkpoint.mkdir(parents=True)
            (checkpoint / "state.json").write_text(json.dumps(
                {"step": 2, "loss_history": [0.5, 0.4], "optimizer": {"param_groups": [], "scalars": {}}}))
            (checkpoint / "adapter.safetensors").write_bytes(b"\x08\x00\x00")  # cut off mid-header
            raise TrainingCancelled("cancelled")
        return Path(request.out)

    runner = _Runner(script)
    jobs = _manager(tmp_path, runner, monkeypatch)
    owner = new_workspace_id(tmp_path)
    try:
        job = jobs.submit(owner, image=EXAMPLES / "cat.jpg", name="cat", **SETTINGS)
        stopped = jobs.wait(owner, job.id, timeout=30)
        assert stopped.status == "cancelled" and stopped.checkpoint_step is None
        assert "checkpoint-000002/adapter.safetensors is damaged" in stopped.error
        assert "Start again" in stopped.error
        jobs.resume(owner, job.id)
        assert jobs.wait(owner, job.id, timeout=30).status == "done"
        assert runner.requests[-1].restart and not runner.requests[-1].resume
    finally:
        jobs.close()


def test_the_queue_has_a_limit_for_everyone(tmp_path):
    from studio.jobs import JobError, JobManager

    jobs = JobManager(tmp_path, start=False, max_queued=4)
    for n in range(4):
        jobs.submit(new_workspace_id(tmp_path), image=EXAMPLES / "cat.jpg", name=f"job{n}", **SETTINGS)
    with pytest.raises(JobError, match="queue is full"):
        jobs.submit(new_workspace_id(tmp_path), image=EXAMPLES / "cat.jpg", **SETTINGS)


def test_web_errors_say_what_went_wrong_and_what_to_do():
    import gradio as gr

    from studio.ui.common import handler

    for exc, words in (
        (OSError(errno.ENOSPC, "No space left on device"), ("disk is full", "free some space")),
        (zipfile.BadZipFile("Bad CRC-32 for file 'x'"), ("zip file is damaged", "make the zip again")),
        (OverflowError("cannot convert float infinity to integer"), ("too large", "smaller value")),
        (PermissionError(errno.EACCES, "Permission denied"), ("permission denied",)),
    ):
        @handler
        def fails(exc=exc):
            raise exc

        with pytest.raises(gr.Error) as info:
            fails()
        for word in words:
            assert word in info.value.message, info.value.message
        assert "Something went wrong" not in info.value.message


# -- model loads racing each other ----------------------------------------------------------------------


def test_model_loads_and_mixes_at_once_all_succeed(cat_package, coffee_package):
    from pipelines.generation import AdapterChoice, StudioPipeline
    from pipelines.models import load_pipeline
    from pipelines.package import AdapterPackage

    studio = StudioPipeline("tiny-sdxl")
    packages = [AdapterPackage.open(cat_package), AdapterPackage.open(coffee_package)]
    errors = []

    def load():
        for _ in range(3):
            try:
                load_pipeline("tiny-sdxl")
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                errors.append(f"load: {exc!r}")

    def mix():
        for i in range(6):
            try:
                studio.generate("A [c]", content=AdapterChoice(packages[i % 2], "content", 1.0), steps=1)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"mix: {exc!r}")

    threads = [threading.Thread(target=load), threading.Thread(target=mix)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # Nothing is left patched: a load now still builds real weights.
    assert torch.nn.Module.register_parameter.__qualname__ == "Module.register_parameter"
    assert not any(p.is_meta for p in load_pipeline("tiny-sdxl").unet.parameters())


def test_weights_written_to_a_package_are_finite(tmp_path):
    from pipelines.package import PackageContents, write_package

    bad = {"up_blocks.0.attentions.0.proj_in.lora_A.weight": torch.full((4, 8), float("nan")),
           "up_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(InvalidAdapter, match="NaN or infinite"):
        write_package(tmp_path / "pkg", PackageContents(name="pkg", info={}, full=bad, parts={}))
    assert list(tmp_path.iterdir()) == []
