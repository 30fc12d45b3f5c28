"""The MixLoRA lab experiment: the balance loss evens out the expert load, MixLoRA learns the tasks, and the LoRA
baseline trains as many numbers."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.mixlora import MixLoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("mixlora", MixLoRASettings.quick())


def test_the_balance_loss_spreads_the_load_more_evenly(result):
    assert result.metrics["load_cv_with"] < result.metrics["load_cv_without"]
    assert result.metrics["final_train_cv_with"] < result.metrics["final_train_cv_without"]


def test_mixlora_learns_the_tasks_and_the_baseline_has_its_budget(result):
    assert result.metrics["mean_accuracy_with"] > result.metrics["mean_accuracy_base"]
    assert abs(result.metrics["parameters_lora"] - result.metrics["parameters_mixlora"]) < 0.05 * result.metrics[
        "parameters_mixlora"]
    assert set(result.figures) == {"expert_load_with_balance_loss", "expert_load_without_balance_loss",
                                   "load_imbalance_during_training", "accuracy_per_task"}


def test_top_k_above_the_number_of_experts_is_refused_in_one_line():
    with pytest.raises(LabSettingsError, match=r"top_k must be at most the number of experts \(4\), not 6"):
        settings_from_dict(MixLoRASettings, {"num_experts": "4", "top_k": "6"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "mixlora", MixLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("load CV (all tasks)" in table["headers"] for table in tables_of(outputs))
