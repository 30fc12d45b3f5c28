"""The DV-LoRA lab experiment: fewer trainable parameters in phase 2, accuracy on the shifted domain."""

from __future__ import annotations

import pytest
import torch

from pipelines.lab import LabResult, LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.data import digits
from pipelines.lab.experiments.dv_lora import DVLoRASettings, endoscope_view
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("dv-lora", DVLoRASettings.quick())


def test_phase_two_trains_only_the_vectors(result):
    # rank 4 on fc1 (64 -> 128) and fc2 (128 -> 64) of four blocks
    assert result.metrics["phase1_parameters"] == 4 * ((4 * 64 + 128 * 4) + (4 * 128 + 64 * 4))
    assert result.metrics["phase2_parameters"] == 4 * ((4 + 128) + (4 + 64))


def test_the_shift_hurts_and_both_phases_recover_accuracy(result):
    assert result.metrics["unadapted_accuracy"] < result.metrics["source_accuracy"] - 0.3
    assert result.metrics["phase1_accuracy"] > result.metrics["unadapted_accuracy"]
    assert result.metrics["phase2_accuracy"] > result.metrics["unadapted_accuracy"]
    assert result.metrics["merge_max_difference"] < 1e-4
    assert {"examples", "accuracy_during_training", "trainable_parameters", "target_accuracy"} <= set(result.figures)


def test_the_result_with_its_image_grid_saves_and_loads(result, tmp_path):
    result.save(tmp_path / "dv")
    loaded = LabResult.load(tmp_path / "dv")
    assert loaded.metrics == result.metrics and set(loaded.figures) == set(result.figures)
    assert (tmp_path / "dv" / "examples.png").stat().st_size > 1000


def test_the_endoscope_view_tints_darkens_the_corners_and_adds_a_spot():
    source = digits("test").head(8)
    seen = endoscope_view(source).inputs
    assert seen.shape == source.inputs.shape and 0 <= seen.min() and seen.max() <= 1
    assert seen[:, 0].mean() > seen[:, 2].mean()  # red cast
    assert seen[:, :, 0, 0].max() < 0.1  # dark corner
    assert torch.equal(endoscope_view(source).inputs, seen)


def test_an_unknown_domain_is_refused():
    with pytest.raises(LabSettingsError, match="shift"):
        settings_from_dict(DVLoRASettings, {"shift": "underwater"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "dv-lora", DVLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("trainable parameters" in table["headers"] for table in tables_of(outputs))
