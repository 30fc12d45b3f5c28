"""Through the app's client: the DyLoRA and SoRA panels run their quick settings and return their plots."""

from __future__ import annotations

import time

import pytest

from pipelines.lab import experiment_for
from studio.ui.lab._panel import ordered_fields


def _form_values(method: str) -> list:
    """The panel's form values for the experiment's quick settings, as a page sends them."""
    settings_cls = experiment_for(method).settings_cls
    quick = settings_cls.quick()
    values = []
    for spec in ordered_fields(settings_cls):
        value = getattr(quick, spec.name)
        values.append(", ".join(map(str, value)) if isinstance(value, tuple) else value)
    return values


@pytest.mark.parametrize("method, figures", [("dylora", 2), ("sora", 3)])
def test_panel_runs_its_quick_setting_and_shows_its_figures(studio_server, method, figures):
    client, workspace = studio_server.session()
    outputs = client.predict(workspace, *_form_values(method), api_name=f"/lab_{method}_run")
    job_id, shown = outputs[0], outputs[-1]
    deadline = time.monotonic() + 300
    while True:
        outputs = client.predict(workspace, job_id, shown, api_name=f"/lab_{method}_status")
        record = next(o for o in outputs if isinstance(o, dict) and "status" in o)
        if record["status"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, "the lab run did not finish"
        time.sleep(0.2)
    assert record["status"] == "done", record
    images = [o["value"] for o in outputs if isinstance(o, dict) and str(o.get("value")).endswith(".png")]
    assert len(images) == figures
    summaries = [o["value"] for o in outputs if isinstance(o, dict) and str(o.get("value")).startswith("On **")]
    assert len(summaries) == 1 and ("DyLoRA" in summaries[0] or "SoRA" in summaries[0])
