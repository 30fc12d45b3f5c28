"""The studio's HTTP API under attack: forged file paths, invented workspace ids, numbers that are not settings,
and what the page is shown."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from studio.ui.common import NOT_AN_UPLOAD
from tests.conftest import EXAMPLES

TRAIN_SETTINGS = ("b-lora", "tiny-sdxl", "", 3, 4, 1e-4, 0, 0, "")


def _forgeries(path: str) -> list:
    """The shapes a client can send in place of an upload: a bare path, a dict, a dict dressed as FileData."""
    return [path, {"path": path}, {"path": path, "orig_name": "x.png"},
            {"path": path, "meta": {"_type": "gradio.FileData"}}]


def _refusal(call) -> str:
    with pytest.raises(AppError) as info:
        call()
    return str(info.value)


def raw_call(server, api_name: str, body: str) -> tuple[str, object]:
    """Call an endpoint with a request body written by hand (gradio_client would upload local paths itself and
    cannot send NaN); return the event ("complete" or "error") and its data."""
    url = server.url.rstrip("/") + f"/gradio_api/call/{api_name}"
    event_id = httpx.post(url, content=body, headers={"content-type": "application/json"}).json()["event_id"]
    text = httpx.get(f"{url}/{event_id}", timeout=120).text
    event = text.split("event: ", 1)[1].split("\n", 1)[0].strip()
    data = json.loads(text.split("data: ", 1)[1].split("\n", 1)[0])
    return event, data


def _raw_refusal(server, api_name: str, *values) -> str | None:
    event, data = raw_call(server, api_name, json.dumps({"data": list(values)}))
    assert event == "error", data
    return data["error"]


def test_forged_file_paths_are_refused_without_telling_which_exist(studio_server, tmp_path):
    client, workspace = studio_server.session()
    server_image = tmp_path / "server-side.png"
    Image.new("RGB", (128, 128), "red").save(server_image)
    not_an_image = studio_server.studio.home / "browser-secret"
    missing = tmp_path / "no-such-file.png"
    answers = {}
    for path in (server_image, not_an_image, missing, tmp_path / ".." / tmp_path.name / "server-side.png"):
        for shape, forged in enumerate(_forgeries(str(path))):
            answers.setdefault(("crop", shape), set()).add(
                _raw_refusal(studio_server, "crop_preview", forged, "tiny-sdxl"))
            answers.setdefault(("train", shape), set()).add(
                _raw_refusal(studio_server, "train", workspace, forged, *TRAIN_SETTINGS))
    # One answer per request shape whatever the path: nothing tells an existing file from a missing one, or an
    # image from a secret. (A bare path or a FileData outside the cache is refused by Gradio itself.)
    assert all(len(messages) == 1 for messages in answers.values()), answers
    assert {m for messages in answers.values() for m in messages} <= {None, NOT_AN_UPLOAD}
    assert studio_server.studio.jobs.jobs(workspace) == []


def test_an_import_cannot_name_a_server_file(studio_server, cat_package):
    client, workspace = studio_server.session()
    weights = str(cat_package / "pytorch_lora_weights.safetensors")
    for forged in _forgeries(weights):
        assert _raw_refusal(studio_server, "import", workspace, forged, "stolen", "tiny-sdxl", "") in (
            None, NOT_AN_UPLOAD)
    assert client.predict(workspace, None, api_name="/library")[0] == []


def test_uploads_and_examples_are_accepted(studio_server):
    client, _ = studio_server.session()
    crop = client.predict(handle_file(str(EXAMPLES / "cat.jpg")), "tiny-sdxl", api_name="/crop_preview")
    assert crop is not None
    # The page offers the shipped examples from Gradio's cache; the files themselves are examples too.
    event, _ = raw_call(studio_server, "crop_preview",
                        json.dumps({"data": [{"path": str(EXAMPLES / "cat.jpg")}, "tiny-sdxl"]}))
    assert event == "complete"


def test_invented_workspace_ids_are_refused(studio_server):
    client = studio_server.client()
    invented = [secrets.token_urlsafe(24) for _ in range(3)]
    for workspace in invented:
        assert len(workspace) == 32
        with pytest.raises(AppError, match="workspace"):
            client.predict(workspace, None, api_name="/library")
        with pytest.raises(AppError, match="workspace"):
            client.predict(workspace, handle_file(str(EXAMPLES / "cat.jpg")), *TRAIN_SETTINGS, api_name="/train")
        # A page that brings one along gets a real id instead.
        issued = client.predict(workspace, api_name="/workspace")
        assert issued != workspace and client.predict(issued, None, api_name="/library")[0] == []
    issued = client.predict(None, api_name="/workspace")
    with pytest.raises(AppError, match="workspace"):
        client.predict(issued + "\n", None, api_name="/library")
    root = studio_server.studio.home / "workspaces"
    assert not any((root / workspace).exists() for workspace in invented)


@pytest.mark.parametrize(("steps", "learning_rate", "seed", "word"), [
    ("3", "1e-4", str(2**80), "seed"),
    ("3", "1e-4", "-1", "seed"),
    ("3", "Infinity", "0", "learning rate"),
    ("3", "NaN", "0", "learning rate"),
    ("1e30", "1e-4", "0", "steps"),
    ("3.5", "1e-4", "0", "steps"),
])
def test_numbers_that_are_not_settings_are_refused_and_nothing_is_queued(studio_server, steps, learning_rate,
                                                                         seed, word):
    client, workspace = studio_server.session()
    with open(EXAMPLES / "cat.jpg", "rb") as handle:
        uploaded = httpx.post(studio_server.url.rstrip("/") + "/gradio_api/upload",
                              files={"files": ("cat.jpg", handle)}).json()[0]
    image = json.dumps({"path": uploaded, "meta": {"_type": "gradio.FileData"}})
    body = (f'{{"data": ["{workspace}", {image}, "b-lora", "tiny-sdxl", "", {steps}, 4, {learning_rate}, '
            f'{seed}, 0, "", "lora"]}}')
    event, data = raw_call(studio_server, "train", body)
    assert event == "error" and data["error"] and word in data["error"], data
    assert studio_server.studio.jobs.jobs(workspace) == []


@pytest.mark.parametrize(("scale", "seed", "steps", "word"), [
    ("NaN", "0", "2", "content scale"),
    ("1.0", "NaN", "2", "seed"),
    ("1.0", "0", "Infinity", "steps"),
])
def test_mixing_refuses_numbers_that_are_not_settings(trained, studio_server, scale, seed, steps, word):
    _, workspace = trained
    body = (f'{{"data": ["{workspace}", "cat", {scale}, "coffee", 1.0, "A [c] in [s] style", false, {seed}, '
            f'{steps}, null, null, null, "", false, "default", false]}}')
    event, data = raw_call(studio_server, "mix", body)
    assert event == "error" and data["error"] and word in data["error"], data


def test_the_job_record_the_page_shows_has_no_owner(trained, studio_server):
    client, workspace = trained
    job_id = studio_server.studio.jobs.jobs(workspace)[0].id
    outputs = client.predict(workspace, job_id, api_name="/job_status")
    record = next(o for o in outputs if isinstance(o, dict) and "status" in o)
    assert "owner" not in record
    assert workspace not in repr(outputs)
