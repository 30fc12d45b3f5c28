"""Several users: each browser's workspace is private, and paths or ids from another one lead nowhere."""

from __future__ import annotations

import httpx
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from tests.conftest import EXAMPLES, path_of


def test_a_second_client_sees_none_of_the_first_ones_packages_or_jobs(trained, studio_server):
    owner_client, owner = trained
    other_client, other = studio_server.session()
    assert other != owner
    assert other_client.predict(other, None, api_name="/library")[0] == []
    for attempt in ("cat", f"../{owner}/packages/cat", f"/{owner}/packages/cat", "shared:../../workspaces"):
        with pytest.raises(AppError):
            other_client.predict(other, attempt, api_name="/inspect")
    job_id = studio_server.studio.jobs.jobs(owner)[0].id
    with pytest.raises(AppError, match="no such training job"):
        other_client.predict(other, job_id, api_name="/job_status")
    with pytest.raises(AppError, match="no such training job"):
        other_client.predict(other, job_id, api_name="/cancel")


def test_malformed_workspace_ids_are_refused(studio_server):
    client = studio_server.client()
    for bad in (None, "", "../../etc", "x" * 31):
        with pytest.raises(AppError, match="workspace"):
            client.predict(bad, None, api_name="/library")


def test_files_are_served_only_from_the_cache_or_by_their_secret_workspace_path(trained, studio_server):
    client, workspace = trained
    base = studio_server.url.rstrip("/") + "/gradio_api/file="
    home = studio_server.studio.home
    refused = [home / "browser-secret", home / "workspaces", EXAMPLES / "cat.jpg"]
    for path in refused:
        assert httpx.get(base + str(path)).status_code == 403, path
    # What the page shows comes through Gradio's cache under a content hash, not the workspace path.
    download, _ = client.predict(workspace, "cat", api_name="/export")
    assert str(home) not in path_of(download)


def test_uploads_must_come_through_the_upload_route(trained, studio_server):
    client, workspace = trained
    secret = studio_server.studio.home / "browser-secret"
    forged = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    with pytest.raises(AppError):
        client.predict(workspace, forged, "", "tiny-sdxl", "", api_name="/import")
    with pytest.raises(AppError):
        client.predict(workspace, handle_file(str(EXAMPLES / "cat.jpg")), "b-lora", "tiny-sdxl", "x", 1, 4, 1e-4,
                       0, 0, "[c]", api_name="/train")


def test_two_users_share_one_training_queue_and_see_their_place_in_it(studio_server):
    from tests.conftest import job_record, start_job

    first_client, first = studio_server.session()
    second_client, second = studio_server.session()
    running = start_job(first_client, first, EXAMPLES / "cat.jpg", steps=200, sample_every=0)
    waiting = start_job(second_client, second, EXAMPLES / "coffee.jpg", steps=200, sample_every=0)
    status_html = second_client.predict(second, waiting, api_name="/job_status")[0]
    assert job_record(second_client, second, waiting)["status"] == "queued"
    assert "1 job ahead of yours" in status_html
    assert job_record(second_client, second, waiting, "/cancel")["status"] == "cancelled"
    job_record(first_client, first, running, "/cancel")
    studio_server.studio.jobs.wait(first, running, timeout=60)


def test_uploads_over_the_size_limit_are_refused(tmp_path):
    from studio.jobs import JobManager
    from tests.conftest import launch_studio, stop_studio

    server = launch_studio(home=tmp_path, jobs=JobManager(tmp_path, start=False), gpu=False,
                           launch_options={"max_file_size": "2kb"})
    try:
        url = server.url.rstrip("/") + "/gradio_api/upload"
        small = httpx.post(url, files={"files": ("small.png", b"\x89PNG" + b"0" * 1000)})
        large = httpx.post(url, files={"files": ("large.png", b"\x89PNG" + b"0" * 4096)})
        assert small.status_code == 200
        assert large.status_code == 413
    finally:
        stop_studio(server)
