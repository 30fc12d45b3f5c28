"""The LQ-LoRA lab experiment: below plain quantisation's error and perplexity at the same memory, budgets held."""

from __future__ import annotations

import pytest

from pipelines.adapters import AdapterError
from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.lq_lora import LQLoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("lq-lora", LQLoRASettings.quick())


def test_lq_lora_reconstructs_better_than_plain_quantisation_at_the_same_bits(result):
    metrics = result.metrics
    assert metrics["lq_error"] < metrics["plain_error"]
    assert metrics["lq_fisher_error"] < metrics["plain_error"]
    assert metrics["lq_perplexity"] < metrics["plain_perplexity"]
    assert metrics["fp_perplexity"] < metrics["lq_perplexity"]


def test_every_plan_holds_its_budget(result):
    for row in result.tables["budgets"]:
        assert row["bits a parameter"] <= row["budget"]
    assert {row["budget"] for row in result.tables["budgets"]} == {2.5, 3.0}
    allocation = result.tables["allocation"]
    assert len(allocation) == 14 and all(row["bits a parameter"] > 2 for row in allocation)


def test_the_result_shows_errors_perplexity_bits_iterations_and_fine_tuning(result):
    assert set(result.figures) == {"reconstruction_error", "perplexity", "bits_per_matrix",
                                   "decomposition_by_iteration", "fine_tuning"}
    tuned = {row["adapter"]: row for row in result.tables["fine_tuning"]}
    assert all(row["answer loss after"] < row["answer loss before"] for row in tuned.values())


def test_duplicate_budgets_are_refused():
    with pytest.raises(LabSettingsError, match="budgets must be one or more different numbers"):
        settings_from_dict(LQLoRASettings, {"budgets": "3, 3"})


def test_a_budget_below_every_format_fails_the_run_with_one_line():
    settings = LQLoRASettings.quick()
    settings.budgets, settings.budget, settings.fisher, settings.steps = (2.0,), 2.0, False, 0
    with pytest.raises(AdapterError, match=r"budget 2 bits a parameter is below the 2\.\d+ that the smallest"):
        run_experiment("lq-lora", settings)


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "lq-lora", LQLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 5
    assert any("bits a parameter" in table["headers"] for table in tables_of(outputs))
