"""The Relaxed Recursive lab experiment: quality rises with the per-depth LoRA rank, for more parameters."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.relaxed_recursive import RelaxedRecursiveSettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("relaxed-recursive", RelaxedRecursiveSettings.quick())


def test_a_larger_rank_starts_closer_to_the_original_for_more_parameters(result):
    m = result.metrics
    assert m["loss_at_conversion_r0"] > m["loss_at_conversion_r4"] > m["loss_at_conversion_r64"]
    # At full rank the SVD start is the original layers again, up to the tied norm weights.
    assert m["loss_at_conversion_r64"] - m["original_loss"] < 0.1 * (m["loss_at_conversion_r0"] - m["original_loss"])
    assert m["parameters_r0"] < m["parameters_r4"] < m["parameters_r64"]
    assert m["parameters_r0"] < 0.6 * m["original_parameters"]


def test_uptraining_closes_most_of_the_fully_recursive_gap(result):
    m = result.metrics
    assert m["loss_after_uptraining_r0"] < m["loss_at_conversion_r0"]
    assert m["loss_after_uptraining_r0"] - m["original_loss"] < 0.5 * (m["loss_at_conversion_r0"] - m["original_loss"])
    assert set(result.figures) == {"quality_vs_parameters", "loss_by_rank", "uptraining"}
    assert [row["rank"] for row in result.tables["models"]] == [0, 4, 64, "original (untied)"]


@pytest.mark.parametrize("values, message", [
    ({"loops": 3}, "loops must divide the model's 2 layers, not 3"),
    ({"ranks": [4, 4]}, "ranks must not repeat a rank"),
    ({"init": "random"}, "init"),
])
def test_bad_settings_are_refused_in_one_line(values, message):
    with pytest.raises(LabSettingsError, match=message):
        run_experiment("relaxed-recursive", settings_from_dict(RelaxedRecursiveSettings,
                                                               {**RelaxedRecursiveSettings.quick().to_dict(),
                                                                **values}))


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "relaxed-recursive", RelaxedRecursiveSettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("parameters" in table["headers"] for table in tables_of(outputs))
