"""The Train tab through its API: train with live progress, cancel within a step, resume, refuse bad uploads."""

from __future__ import annotations

import time

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from tests.conftest import EXAMPLES, job_record, start_job, train_through_app


def test_training_reports_progress_previews_and_lands_in_the_library(studio_server):
    client, workspace = studio_server.session()
    record = train_through_app(client, workspace, EXAMPLES / "rocket.jpg", steps=3, sample_every=1)
    assert record["status"] == "done"
    assert record["step"] == record["total"] == 3
    assert len(record["losses"]) == 3 and record["it_s"] > 0
    assert record["samples"] == ["step-000001.png", "step-000002.png", "step-000003.png"]
    # A page that was polling has these previews already; a page opened now gets them all.
    polled = client.predict(workspace, record["id"], api_name="/job_status")[2]
    assert polled.get("__type__") == "update" and "value" not in polled
    status_html, _, gallery, *_ = studio_server.client().predict(workspace, record["id"], api_name="/job_status")
    assert "Step <b>3</b> / 3" in status_html
    assert any(item["caption"] == "content + style" for item in gallery)
    library = client.predict(workspace, None, api_name="/library")[0]
    assert [item["caption"].split(" · ")[0] for item in library] == ["rocket"]


def test_cancel_stops_within_a_step_and_resume_continues_from_the_checkpoint(studio_server):
    client, workspace = studio_server.session()
    job_id = start_job(client, workspace, EXAMPLES / "cat.jpg", steps=30, name="long", sample_every=0)
    deadline = time.monotonic() + 120
    while job_record(client, workspace, job_id)["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    asked_at = job_record(client, workspace, job_id, "/cancel")["step"]
    studio_server.studio.jobs.wait(workspace, job_id, timeout=60)
    record = job_record(client, workspace, job_id)
    assert record["status"] == "cancelled"
    assert record["step"] <= asked_at + 1  # the step running when Cancel arrived finishes, no more
    assert record["checkpoint_step"] == record["step"]
    stopped_at = record["step"]

    assert job_record(client, workspace, job_id, "/resume")["status"] == "queued"
    record = studio_server.studio.jobs.wait(workspace, job_id, timeout=300)
    assert record.status == "done"
    assert record.resumed_from == stopped_at
    assert len(record.losses) == record.step == 30


@pytest.mark.parametrize(("content", "message"), [
    (b"this is not an image", "not an image"),
    (None, "at least 64 pixels"),
])
def test_bad_uploads_are_refused_with_a_message(studio_server, tmp_path, content, message):
    from PIL import Image

    client, workspace = studio_server.session()
    upload = tmp_path / "upload.png"
    if content is None:
        Image.new("RGB", (40, 30), "red").save(upload)
    else:
        upload.write_bytes(content)
    with pytest.raises(AppError) as error:
        client.predict(workspace, handle_file(str(upload)), "b-lora", "tiny-sdxl", "", 3, 4, 1e-4, 0, 0, "",
                       api_name="/train")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)
    assert studio_server.studio.jobs.jobs(workspace) == []


def test_settings_out_of_range_are_refused(studio_server):
    client, workspace = studio_server.session()
    image = handle_file(str(EXAMPLES / "cat.jpg"))
    with pytest.raises(AppError, match="steps must be between"):
        client.predict(workspace, image, "b-lora", "tiny-sdxl", "", 0, 4, 1e-4, 0, 0, "", api_name="/train")
    with pytest.raises(AppError, match="rank of at least 2"):
        client.predict(workspace, image, "splitflux", "tiny-flux", "", 3, 1, 1e-4, 0, 0, "", api_name="/train")
    with pytest.raises(AppError, match="FLUX model; this method needs SDXL"):
        client.predict(workspace, image, "b-lora", "tiny-flux", "", 3, 4, 1e-4, 0, 0, "", api_name="/train")
    with pytest.raises(AppError, match="unknown base model"):
        client.predict(workspace, image, "b-lora", "/etc", "", 3, 4, 1e-4, 0, 0, "", api_name="/train")
    with pytest.raises(AppError, match="not allowed"):
        client.predict(workspace, image, "b-lora", "tiny-sdxl", "../escape", 3, 4, 1e-4, 0, 0, "",
                       api_name="/train")
