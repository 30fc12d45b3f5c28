"""Through the app's client: the DyLoRA and SoRA panels run their quick settings and return their plots."""

from __future__ import annotations

import pytest

from pipelines.lab import EXPERIMENTS
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.mark.parametrize("method, figures, tables", [("dylora", 2, 2), ("sora", 3, 3)])
def test_panel_runs_its_quick_setting_and_shows_its_figures(studio_server, method, figures, tables):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, method, EXPERIMENTS[method].settings_cls.quick())
    assert record_of(outputs)["status"] == "done", record_of(outputs)
    assert len(figures_of(outputs)) == figures
    assert len([t for t in tables_of(outputs) if t["data"]]) == tables
    summaries = [o["value"] for o in outputs if isinstance(o, dict) and str(o.get("value")).startswith("On **")]
    assert len(summaries) == 1 and ("DyLoRA" in summaries[0] or "SoRA" in summaries[0])
