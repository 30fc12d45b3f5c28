"""The SMoRA lab experiment: the tasks switch on different ranks, the balancing bias moves and evens the rank
loads, and SMoRA learns the tasks."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.smora import SMoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("smora", SMoRASettings.quick())


def test_tasks_activate_different_ranks(result):
    # Two tasks' activation shares differ far more than two halves of one task's test set.
    assert result.metrics["task_distance"] > 3 * result.metrics["within_task_distance"]
    assert result.metrics["task_distance_shown"] > 3 * result.metrics["within_task_distance_shown"]


def test_the_bias_moves_and_evens_the_rank_loads(result):
    assert result.metrics["largest_bias"] > 0
    assert result.metrics["load_cv_with_bias"] < result.metrics["load_cv_without_bias"]


def test_smora_learns_the_tasks(result):
    assert result.metrics["mean_accuracy_smora"] > result.metrics["mean_accuracy_base"]
    assert "rank_activation_per_task" in result.figures and len(result.figures) == 5


def test_more_active_ranks_than_ranks_is_refused_in_one_line():
    with pytest.raises(LabSettingsError, match=r"activate_r must be at most the rank \(8\), not 9"):
        settings_from_dict(SMoRASettings, {"rank": "8", "activate_r": "9"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "smora", SMoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 5
    assert any("mean token accuracy" in table["headers"] for table in tables_of(outputs))
