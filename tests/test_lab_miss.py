"""The MiSS lab experiment: the paper's sine toy, first-step gradients and an exact merge round trip."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.miss import MissToySettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("miss", MissToySettings.quick())


def test_adapters_train_the_same_number_of_parameters(result):
    counts = {result.metrics[f"parameters_{k}"] for k in ("lora", "miss", "miss_bat", "miss_mini")}
    assert counts == {2 * 256}  # 256 numbers per 64 x 64 layer, two layers
    assert result.metrics["parameters_full"] > 10 * result.metrics["parameters_lora"]


def test_miss_starts_with_a_larger_gradient_than_lora(result):
    lora = result.metrics["initial_gradient_norm_lora"]
    assert result.metrics["initial_gradient_norm_miss"] > lora
    assert result.metrics["initial_gradient_norm_miss_bat"] > lora


def test_adapting_lowers_the_validation_loss_and_full_fine_tuning_most(result):
    before = result.metrics["validation_loss_before"]
    keys = ("lora", "miss", "miss_bat", "miss_mini", "full")
    assert all(result.metrics[f"min_validation_loss_{k}"] < before for k in ("lora", "miss", "miss_bat", "full"))
    assert result.metrics["min_validation_loss_full"] == min(result.metrics[f"min_validation_loss_{k}"] for k in keys)


def test_each_miss_mode_merges_without_changing_outputs_and_unmerges_exactly(result):
    for mode in ("miss", "miss_bat", "miss_mini"):
        assert result.metrics[f"merge_max_difference_{mode}"] < 1e-4
        assert result.metrics[f"unmerge_exact_{mode}"] == 1.0
    assert set(result.figures) == {"validation_loss", "initial_gradient_norm", "fit", "merge"}
    assert "bit for bit" in result.summary


def test_a_rank_that_does_not_divide_the_width_is_refused():
    with pytest.raises(LabSettingsError, match="miss_rank"):
        settings_from_dict(MissToySettings, {"miss_rank": "5"})
    with pytest.raises(LabSettingsError, match="noise"):
        settings_from_dict(MissToySettings, {"noise": "nan"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "miss", MissToySettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("minimum validation loss" in table["headers"] for table in tables_of(outputs))
