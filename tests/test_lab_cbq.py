"""The CBQ lab experiment: cross-block reconstruction below round-to-nearest at the same bits."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.cbq import CBQSettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("cbq", CBQSettings.quick())


def test_cross_block_reconstruction_beats_round_to_nearest_at_the_same_bits(result):
    metrics = result.metrics
    assert metrics["crossblock_perplexity"] < metrics["rtn_perplexity"]
    assert metrics["blockwise_perplexity"] < metrics["rtn_perplexity"]
    assert metrics["crossblock_last_block_error"] < metrics["rtn_last_block_error"]
    assert metrics["fp_perplexity"] < metrics["crossblock_perplexity"]


def test_lora_rounding_learns_far_fewer_numbers_than_adaround(result):
    # rank 4 on the 14 projections of two 64-wide blocks (MLP 172 wide)
    per_block = 4 * 4 * (64 + 64) + 2 * 4 * (64 + 172) + 4 * (172 + 64)
    assert result.metrics["rounding_parameters"] == 2 * per_block
    assert result.metrics["adaround_parameters"] == 2 * (4 * 64 * 64 + 3 * 64 * 172)
    rows = {row["method"]: row for row in result.tables["quantisation"]}
    assert rows["block-wise"]["windows (blocks)"] == "1, 2" and rows["cross-block"]["windows (blocks)"] == "1-2"
    assert set(result.figures) == {"perplexity", "per_block_error", "calibration_loss"}


def test_an_overlap_as_large_as_the_window_is_refused():
    with pytest.raises(LabSettingsError, match="overlap must be smaller than the window"):
        settings_from_dict(CBQSettings, {"window_size": 2, "overlap": 2})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "cbq", CBQSettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("perplexity" in table["headers"] for table in tables_of(outputs))
