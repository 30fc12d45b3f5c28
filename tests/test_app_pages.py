"""What a first-time user sees: blank settings, the finishing stage, job and package lists, sizes, Hub errors."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.package import PackageContents, write_package
from studio.jobs import JobError, JobManager, JobRecord
from studio.workspace import new_workspace_id
from tests.conftest import EXAMPLES, ROOT, job_record, path_of, start_job, train_through_app
from tests.test_jobs import (
    SETTINGS,
    _wait_for,
    manager,  # noqa: F401  (the fixture: jobs served by a stand-in runner)
)

BLANK = [0, "", "", "", "", ""]  # seed and the settings boxes as a page sends them when left blank


# -- Generation settings ------------------------------------------------------------------------------------


def test_blank_generation_settings_are_the_models_defaults_and_bad_ones_name_their_box():
    from studio.mixing import GenerationError
    from studio.ui.mix import make_settings

    settings = make_settings(3, "", " ", None, "", "")
    assert (settings.seed, settings.steps, settings.guidance, settings.width, settings.height) == (3, None, None,
                                                                                                   None, None)
    settings = make_settings(0, "12", "4.5", "128", 96, "blurry")
    assert (settings.steps, settings.guidance, settings.width, settings.height) == (12, 4.5, 128, 96)
    for boxes, name in ((("abc", "", "", ""), "steps"), (("", "", "2.5", ""), "width"),
                        (("", "nan", "", ""), "guidance")):
        with pytest.raises(GenerationError, match=f"^{name} must be a"):
            make_settings(0, *boxes, "")


def test_mix_and_reembed_generate_with_the_settings_boxes_left_blank(trained):
    client, workspace = trained
    slider, used, _, _ = client.predict(workspace, "cat", 1.0, "coffee", 1.0, "A [c] in [s] style", False, *BLANK,
                                        api_name="/mix")
    assert Image.open(path_of(slider[1])).size == (64, 64)  # tiny-sdxl's own size
    gallery = client.predict(workspace, "cat", 1.0, ["A [c] made of gold"], "", *BLANK, api_name="/reembed")
    assert len(gallery) == 1
    with pytest.raises(AppError, match="steps must be a whole number"):
        client.predict(workspace, "cat", 1.0, "coffee", 1.0, "A [c]", False, 0, "ten", "", "", "", "",
                       api_name="/mix")


# -- the Train tab's status card ------------------------------------------------------------------------------


def test_a_job_past_its_last_step_shows_that_it_is_saving(request):
    from studio.ui.train import render_status

    jobs, runner = request.getfixturevalue("manager")
    owner = new_workspace_id(jobs.home)
    record = jobs.submit(owner, image=EXAMPLES / "cat.jpg", name="cat", **dict(SETTINGS, steps=1))
    _wait_for(lambda: jobs.get(owner, record.id).step == 1)  # the runner reported step 1 of 1 and still runs
    running = jobs.get(owner, record.id)
    assert running.status == "running"
    card = render_status(running, None)
    assert "Finishing" in card and "saving the package and rendering its samples" in card
    assert "ETA –" in card and "Training<" not in card
    runner.gates["cat"].set()
    _wait_for(lambda: jobs.get(owner, record.id).status == "done")
    assert "Finishing" not in render_status(jobs.get(owner, record.id), None)


def test_a_queued_job_shows_no_speed_from_its_last_run():
    from studio.ui.train import render_status

    record = JobRecord(id="20250101-000000-abcdef", owner=new_workspace_id(), method="b-lora", model="tiny-sdxl",
                       name="cat", settings={}, status="queued", step=11, total=40, it_s=3.276)
    assert "– it/s" in render_status(record, 1) and "3.28" not in render_status(record, 1)
    record.status = "running"
    assert "3.28 it/s" in render_status(record, None)


def test_discarding_a_job_keeps_showing_the_jobs_that_remain(studio_server):
    client, workspace = studio_server.session()
    running = start_job(client, workspace, EXAMPLES / "cat.jpg", steps=400, name="long", sample_every=0)
    waiting = start_job(client, workspace, EXAMPLES / "coffee.jpg", steps=3, name="later", sample_every=0)
    try:
        job_record(client, workspace, waiting, "/cancel")
        picker, status, *_ = client.predict(workspace, waiting, api_name="/discard")
        assert picker["value"] == running
        assert [value for _, value in picker["choices"]] == [running]
        assert "long" in status and "No training yet" not in status
    finally:
        job_record(client, workspace, running, "/cancel")
        studio_server.studio.jobs.wait(workspace, running, timeout=120)


def test_the_loss_plot_is_empty_before_the_first_step_and_not_resent_unchanged(trained, studio_server):
    client, workspace = studio_server.session()
    assert client.predict(workspace, "", api_name="/job_status")[1] is None
    _, trained_workspace = trained
    job = studio_server.studio.jobs.jobs(trained_workspace)[0]
    page = studio_server.client()  # a page opened now: its first poll draws the curve, the next sends nothing
    first = page.predict(trained_workspace, job.id, api_name="/job_status")[1]
    again = page.predict(trained_workspace, job.id, api_name="/job_status")[1]
    assert [row[0] for row in first["data"]] == list(range(1, len(job.losses) + 1))
    assert again.get("__type__") == "update" and "value" not in again


def test_the_base_model_box_shows_names_and_the_tokens_each_method_makes(tmp_path):
    from studio.app import build_app
    from studio.methods import METHODS
    from studio.ui.train import model_choices

    assert "[v" in METHODS["b-lora"].token_hint
    assert "[c" in METHODS["splitflux"].token_hint and "[v" not in METHODS["splitflux"].token_hint
    demo = build_app(tmp_path, jobs=JobManager(tmp_path, start=False), gpu=False)
    assert model_choices(demo.studio, "sdxl") == [("tiny-sdxl", "tiny-sdxl")]
    assert model_choices(demo.studio, "flux") == [("tiny-flux", "tiny-flux")]
    boxes = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert boxes["train-token"].placeholder == METHODS["b-lora"].token_hint
    assert boxes["train-model"].info.startswith("random-weight SDXL")


def test_the_banner_names_the_model_of_the_chosen_method():
    from studio.ui.common import banner

    assert "`tiny-flux`" in banner(False, "tiny-flux")[1] and "tiny-sdxl" not in banner(False, "tiny-flux")[1]
    assert "`tiny-sdxl`" in banner(False, "tiny-sdxl")[1]


def test_readme_states_the_job_limit_the_queue_enforces(request):
    text = " ".join((ROOT / "README.md").read_text().split())
    stated = re.search(r"at most (\w+) jobs per user, the running one included", text)
    assert stated, "the README no longer states the per-user job limit"
    jobs, runner = request.getfixturevalue("manager")
    limit = {"two": 2, "three": 3, "four": 4, "five": 5}[stated[1]]
    assert jobs.max_active_per_owner == limit
    owner = new_workspace_id(jobs.home)
    for n in range(limit):
        jobs.submit(owner, image=EXAMPLES / "cat.jpg", name=f"cat{n}", **SETTINGS)
    _wait_for(lambda: runner.started == ["cat0"])  # one running, the others waiting
    with pytest.raises(JobError, match=f"already have {limit} jobs"):
        jobs.submit(owner, image=EXAMPLES / "cat.jpg", **SETTINGS)


# -- package lists ----------------------------------------------------------------------------------------------


def _fake_package(folder, base_model: str, arch: str, created: str) -> None:
    """A package on `base_model` with content and style parts (weights do not matter to the lists)."""
    prefix = "transformer" if arch == "flux" else "unet"
    module = "single_transformer_blocks.0.attn.to_q" if arch == "flux" else \
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{module}.lora_A.weight": torch.zeros(1, 4), f"{module}.lora_B.weight": torch.zeros(4, 1)}
    info = {"method": "splitflux" if arch == "flux" else "b-lora", "base_model": base_model, "arch": arch,
            "token": "[v1]", "created": created}
    write_package(folder, PackageContents(name=folder.name, info=info, full=state,
                                          parts={"content": state, "style": state}, prefix=prefix))


def test_mix_offers_only_packages_that_fit_the_chosen_content(studio_server):
    from studio.ui.common import picker_updates

    studio = studio_server.studio
    workspace = new_workspace_id(studio.home)
    packages = studio.workspace_of(workspace).packages
    _fake_package(packages / "cat", "tiny-sdxl", "sdxl", "2025-01-01T10:00:00")
    _fake_package(packages / "coffee", "tiny-sdxl", "sdxl", "2025-01-01T11:00:00")
    _fake_package(packages / "real", "sdxl", "sdxl", "2025-01-01T12:00:00")  # a base this CPU studio does not run
    _fake_package(packages / "ink", "tiny-flux", "flux", "2025-01-01T13:00:00")  # the newest
    ids = [p.dropdown.elem_id for p in studio.package_pickers]

    def lists(selected):
        updates = picker_updates(studio, workspace, selected)
        return {i: ([v for _, v in u.choices], u.value) for i, u in zip(ids, updates, strict=True)}

    fresh = lists([None] * len(ids))
    # A fresh page mixes two packages of one base model, not the newest package with itself.
    assert fresh["mix-content"] == (["ink", "coffee", "cat"], "coffee")
    assert fresh["mix-style"] == (["coffee", "cat"], "cat")
    assert fresh["reembed-content"][0] == ["ink", "coffee", "cat"]
    assert fresh["library-package"][0] == ["ink", "real", "coffee", "cat"]  # the library lists everything
    chosen = [{"mix-content": "ink", "mix-style": "cat"}.get(i, v) for i, (_, v) in fresh.items()]
    after = lists(chosen)
    assert after["mix-content"] == (["ink", "coffee", "cat"], "ink")
    assert after["mix-style"] == (["ink"], "ink")  # a Flux content mixes with a Flux style only


# -- the Library and Share tabs ----------------------------------------------------------------------------------


def test_a_renamed_package_is_renamed_in_the_job_list_too(studio_server):
    client, workspace = studio_server.session()
    record = train_through_app(client, workspace, EXAMPLES / "rocket.jpg", name="rocket", sample_every=0)
    client.predict(workspace, "rocket", "launch", api_name="/rename")
    (job,) = studio_server.studio.jobs.jobs(workspace)
    assert job.name == "launch"
    status, _, gallery, *_ = studio_server.client().predict(workspace, record["id"], api_name="/job_status")
    assert "<b>launch</b>" in status and "rocket" not in status
    assert any(item["caption"] == "content + style" for item in gallery)  # the samples of the renamed package


def test_an_imported_kohya_file_shows_its_rank_and_a_tile_with_its_name(trained, tmp_path):
    client, workspace = trained
    source = tmp_path / "outside.safetensors"
    exported = path_of(client.predict(workspace, "cat", api_name="/export")[0])
    with zipfile.ZipFile(exported) as archive:
        source.write_bytes(archive.read("cat/kohya/cat.safetensors"))
    client.predict(workspace, handle_file(str(source)), "outside", "tiny-sdxl", "[v9]", api_name="/import")
    facts = client.predict(workspace, "outside", api_name="/inspect")[0]
    assert "rank 4" in facts and "{" not in facts and "imported from `outside.safetensors`" in facts
    gallery = client.predict(workspace, None, api_name="/library")[0]
    (tile,) = [item for item in gallery if item["caption"].startswith("outside ·")]
    colours = Image.open(path_of(tile["image"])).convert("RGB").getcolors(maxcolors=100_000)
    assert len(colours) > 2  # text drawn on it, not a blank square
    client.predict(workspace, "outside", api_name="/delete")


def test_file_sizes_read_as_people_read_them(trained):
    from studio.ui.common import format_size

    assert [format_size(n) for n in (0, 812, 3_400, 171_300_000, 1_200_000_000)] == \
        ["0 B", "812 B", "3.4 kB", "171.3 MB", "1.2 GB"]
    client, workspace = trained
    download, table = client.predict(workspace, "cat", api_name="/export")
    assert "0.00 MB" not in table and re.search(r"`cat/adapter.json` \| \d+(\.\d)? kB", table)


def test_an_unreachable_hub_is_named_as_such(trained, studio_server, monkeypatch):
    import socket

    import huggingface_hub.constants

    from studio.hub import HubError, push_package

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = studio_server.studio.library(trained[1]).path("cat")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for endpoint in (closed, "http://hub.invalid"):
        with pytest.raises(HubError) as error:
            push_package(folder, "alice/cat", token="hf_NotARealTokenAtAll1", endpoint=endpoint)
        assert "cannot be reached" in str(error.value) and "Errno" not in str(error.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_package(folder, "alice/cat", token="hf_NotARealTokenAtAll1", endpoint=closed)


def test_a_tiny_model_card_names_no_hub_base_model():
    from pipelines.model_card import render_model_card

    for base, arch in (("tiny-sdxl", "sdxl"), ("tiny-flux", "flux")):
        card = render_model_card({"method": "b-lora", "base_model": base, "arch": arch, "name": "cat"})
        assert "base_model:" not in card.split("---")[1] and f'model_path("{base}")' in card
    card = render_model_card({"method": "b-lora", "base_model": "sdxl", "arch": "sdxl", "name": "cat"})
    assert 'base_model: "stabilityai/stable-diffusion-xl-base-1.0"' in card.split("---")[1]


def test_results_made_within_one_second_list_newest_first(tmp_path):
    from studio.mixing import recent_outputs, save_output
    from studio.workspace import Workspace

    workspace = Workspace(new_workspace_id(tmp_path), tmp_path)
    for n in range(6):
        save_output(workspace, Image.new("RGB", (8, 8)), {"prompt": f"p{n}", "seed": n})
    assert [caption for _, caption in recent_outputs(workspace)] == [f"p{n} · seed {n}" for n in reversed(range(6))]
