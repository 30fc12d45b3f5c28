"""The Block-LoRA lab experiment: fewer parameters than CLIP-LoRA, and few-shot accuracy above the head alone."""

from __future__ import annotations

import pytest

from pipelines.adapters import block_lora_parameter_count
from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.data import shifted_digits
from pipelines.lab.experiments.block_lora import BlockLoRASettings, few_shots
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("block-lora", BlockLoRASettings.quick())


def test_block_lora_trains_fewer_parameters_than_clip_lora(result):
    # q, k, v (64 -> 64) of four blocks at rank 2, n = 8
    assert result.metrics["parameters_block_lora"] == 12 * block_lora_parameter_count(64, 64, 2, 8) == 12 * 144
    assert result.metrics["parameters_lora"] == 12 * (64 + 64) * 2


def test_both_adapters_beat_the_head_alone(result):
    k = BlockLoRASettings.quick().shots[-1]
    assert result.metrics[f"accuracy_block_lora_{k}"] > result.metrics[f"accuracy_head_{k}"]
    assert result.metrics[f"accuracy_lora_{k}"] > result.metrics[f"accuracy_head_{k}"]
    assert result.metrics["merge_max_difference"] < 1e-4
    assert set(result.figures) == {"accuracy_vs_shots", "trainable_parameters", "block_lora_update"}


def test_few_shots_take_k_images_of_every_class():
    data = shifted_digits("train", "rotation")
    shots = few_shots(data, 3, seed=1)
    assert sorted(shots.labels.tolist()) == sorted(list(range(10)) * 3)
    assert few_shots(data, 3, seed=1).inputs.equal(shots.inputs)


def test_repeated_shot_counts_are_refused():
    with pytest.raises(LabSettingsError, match="shots"):
        settings_from_dict(BlockLoRASettings, {"shots": "4, 4"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "block-lora", BlockLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("Block-LoRA" in table["headers"] for table in tables_of(outputs))
