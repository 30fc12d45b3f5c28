"""The ExPLoRA lab experiment: extended pre-training on the shifted digits helps a linear probe there."""

from __future__ import annotations

import pytest

from pipelines.adapters import AdapterError
from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.explora import ExPLoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("explora", ExPLoRASettings.quick())


def test_extended_pretraining_raises_the_linear_probe_on_the_shifted_domain(result):
    m = result.metrics
    assert m["source_probe_on_target"] < m["source_probe_on_source"]  # the shift costs the source model
    assert m["explora_probe_on_target"] > m["source_probe_on_target"]


def test_only_the_last_block_the_lora_and_the_norms_train(result):
    m = result.metrics
    # One 64-wide block of the tiny ViT (MLP 128) in full, LoRA rank 8 on Q and V of the three others, their norms.
    block = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 4 * 64
    norms = 3 * 2 * (64 + 64)  # the two LayerNorms of each LoRA block
    assert m["trainable_parameters"] == block + 3 * 2 * 8 * (64 + 64) + norms
    assert m["trainable_fraction"] == pytest.approx(m["trainable_parameters"] / m["backbone_parameters"])
    assert set(result.figures) == {"linear_probe", "trainable_fraction", "pretraining_loss"}


def test_an_unfrozen_block_the_vit_does_not_have_is_refused_in_one_line():
    settings = settings_from_dict(ExPLoRASettings, {"unfrozen_blocks": [7], "pretrain_steps": 1, "probe_steps": 1})
    with pytest.raises(AdapterError, match=r"^ExPLoRA unfrozen block 7 does not exist: the targets hold 4 blocks"):
        run_experiment("explora", settings)


@pytest.mark.parametrize("values, message", [
    ({"objective": "contrastive"}, "objective"),
    ({"shift": "blur"}, "shift"),
    ({"teacher_momentum": 1.5}, "teacher_momentum"),
])
def test_bad_settings_are_refused_in_one_line(values, message):
    with pytest.raises(LabSettingsError, match=message):
        settings_from_dict(ExPLoRASettings, values)


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "explora", ExPLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("linear-probe accuracy" in table["headers"] for table in tables_of(outputs))
