"""The Adapter lab through the app's API: a panel runs its quick setting through the job queue and returns its
figures, bad settings get one line naming the field, Cancel stops a run, a failed run leaves the queue
serving, and the Overview lists every registered method."""

from __future__ import annotations

import time

import pytest
from gradio_client.exceptions import AppError

from pipelines.adapters import METHODS
from pipelines.lab import EXPERIMENTS
from studio.ui.lab._panel import ordered_fields
from tests.lab_client import figures_of, form_values, poll_until_stopped, record_of, start_panel, tables_of


def test_the_lora_panel_runs_its_quick_setting_and_shows_figures_tables_and_summary(studio_server):
    client, workspace = studio_server.session()
    quick = EXPERIMENTS["lora"].settings_cls.quick()
    started = client.predict(workspace, *form_values(quick), api_name="/lab_lora_run")
    job_id = started[0]
    assert record_of(started)["status"] in ("queued", "running")
    outputs = poll_until_stopped(client, workspace, "lora", job_id)
    record = record_of(outputs)
    assert record["status"] == "done" and record["fraction"] == 1.0 and record["error"] is None
    assert len(figures_of(outputs)) == 3
    summary = next(o["value"] for o in outputs if isinstance(o, dict) and "untrained adapter scores" in
                   str(o.get("value", "")))
    assert "rank 4" in summary
    assert any("test accuracy" in t["headers"] for t in tables_of(outputs))
    # The page is reloaded: opening the panel again shows the finished run and its figures.
    reopened = studio_server.client().predict(workspace, api_name="/lab_lora_latest")
    assert reopened[0] == job_id and len(figures_of(reopened)) == 3


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be between 1 and 5000, not 0"),
    ("alpha", "nan", "alpha must be a finite number"),
    ("steps", True, "steps must be a whole number, not True"),
    ("ranks", "1, two", "each value of ranks must be a whole number, not 'two'"),
    ("task", "poetry", "task must be one of"),
])
def test_bad_settings_get_one_line_naming_the_field_and_queue_nothing(studio_server, field, value, message):
    client, workspace = studio_server.session()
    settings = EXPERIMENTS["lora"].settings_cls.quick()
    values = form_values(settings)
    values[[s.name for s in ordered_fields(type(settings))].index(field)] = value
    with pytest.raises(AppError) as error:
        client.predict(workspace, *values, api_name="/lab_lora_run")
    assert message in str(error.value) and "Traceback" not in str(error.value)
    assert studio_server.studio.jobs.jobs(workspace, kind=None) == []


def test_cancel_stops_a_lab_run_and_a_failed_run_leaves_the_queue_serving(studio_server):
    client, workspace = studio_server.session()
    full = EXPERIMENTS["lora"].settings_cls()
    job_id = client.predict(workspace, *form_values(full), api_name="/lab_lora_run")[0]
    deadline = time.monotonic() + 120
    while record_of(client.predict(workspace, job_id, api_name="/lab_lora_status"))["fraction"] < 0.05:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert record_of(client.predict(workspace, job_id, api_name="/lab_lora_cancel"))["status"] == "cancelling"
    stopped = record_of(poll_until_stopped(client, workspace, "lora", job_id, timeout=60))
    assert stopped["status"] == "cancelled" and stopped["fraction"] < 0.5

    # A Hub model that is not cached fails the run in the worker, with one line in the record.
    missing = EXPERIMENTS["lora"].settings_cls.quick()
    missing.model_id = "nobody/no-such-encoder"
    failed_id = start_panel(client, workspace, "lora", missing)
    failed = record_of(poll_until_stopped(client, workspace, "lora", failed_id, timeout=60))
    assert failed["status"] == "failed" and "nobody/no-such-encoder" in failed["error"]
    assert "\n" not in failed["error"] and "tiny-encoder" in failed["error"]

    quick = EXPERIMENTS["lora"].settings_cls.quick()
    quick.ranks = (2,)
    assert record_of(poll_until_stopped(client, workspace, "lora", start_panel(client, workspace, "lora", quick))
                     )["status"] == "done"


def test_a_run_of_another_workspace_is_not_shown(studio_server):
    client, workspace = studio_server.session()
    _, other = studio_server.session()
    job_id = start_panel(client, workspace, "lora", EXPERIMENTS["lora"].settings_cls.quick())
    with pytest.raises(AppError, match="no such training job"):
        client.predict(other, job_id, api_name="/lab_lora_status")
    studio_server.studio.jobs.cancel(workspace, job_id)


def test_the_overview_lists_every_method_and_each_experiment_has_a_tab(studio_server):
    demo = studio_server.demo
    overview = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "lab-overview")
    for name, info in METHODS.items():
        assert f"**{info.title}** (`{name}`)" in overview
    assert "panel ready" in overview
    tabs = [b.label for b in demo.blocks.values() if type(b).__name__ == "Tab"]
    for name in EXPERIMENTS:
        assert METHODS[name].title in tabs
