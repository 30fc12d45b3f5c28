"""The GS-LoRA lab experiment: the chosen classes are forgotten task by task while the others stay."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.gs_lora import GSLoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("gs-lora", GSLoRASettings.quick())


def test_forgotten_classes_fall_below_the_rest_task_by_task(result):
    m = result.metrics
    assert m["forgotten_accuracy_0"] > 0.5
    for task in (1, 2):
        assert m[f"forgotten_accuracy_{task}"] < 0.5 * m["forgotten_accuracy_0"]
        assert m[f"forgotten_accuracy_{task}"] < m[f"kept_accuracy_{task}"]
        assert m[f"kept_accuracy_{task}"] > m["kept_accuracy_0"] - 0.1
    assert [row["classes forgotten"] for row in result.tables["accuracy"]] == ["none", "0", "0, 1"]


def test_unneeded_groups_go_exactly_to_zero_while_the_task_still_forgets(result):
    m = result.metrics
    zeroed = [(t, b) for t in (1, 2) for b in range(4) if m[f"zero_group_task{t}_block {b}"]]
    assert zeroed, "no block's group ended exactly zero"
    for t, b in zeroed:
        assert m[f"group_norm_task{t}_block {b}"] == 0.0 and m[f"update_norm_task{t}_block {b}"] == 0.0
        assert f"block {b}" in result.tables["group norms"][t - 1]["groups exactly zero"]
    assert m["zero_groups_task1"] + m["zero_groups_task2"] < 8  # some blocks carry the forgetting
    for t in {t for t, _ in zeroed}:
        assert m[f"forgotten_accuracy_{t}"] < 0.2 < m[f"kept_accuracy_{t}"] - 0.5
    assert "Groups exactly zero" in result.summary and f"block {zeroed[0][1]}" in result.summary


def test_the_official_penalty_only_shrinks_groups():
    settings = settings_from_dict(GSLoRASettings, {**GSLoRASettings.quick().to_dict(), "forget_classes": [0],
                                                   "sparsity": "penalty"})
    m = run_experiment("gs-lora", settings).metrics
    assert m["zero_groups_task1"] == 0 and all(m[f"group_norm_task1_block {b}"] > 0 for b in range(4))
    assert m["forgotten_accuracy_1"] < 0.5 * m["forgotten_accuracy_0"]


def test_each_task_reports_the_norm_of_every_blocks_group(result):
    norms = [[row[f"block {b}"] for b in range(4)] for row in result.tables["group norms"]]
    assert len(norms) == 2 and all(value >= 0 for row in norms for value in row)
    assert set(result.figures) == {"accuracy_by_task", "class_accuracy", "group_norms", "update_norms", "training"}


def test_gs_lora_plus_plus_forgets_with_its_prototype_term():
    settings = settings_from_dict(GSLoRASettings, {**GSLoRASettings.quick().to_dict(), "forget_classes": [0],
                                                   "prototypes": True})
    m = run_experiment("gs-lora", settings).metrics
    assert m["forgotten_accuracy_1"] < 0.5 * m["forgotten_accuracy_0"]
    assert m["kept_accuracy_1"] > m["kept_accuracy_0"] - 0.1


@pytest.mark.parametrize("values, message", [
    ({"forget_classes": [3, 12]}, r"^forget_classes: class 12 does not exist: the model has classes 0 to 9$"),
    ({"forget_classes": [2, 2]}, "named twice"),
    ({"forget_classes": list(range(10))}, "at least one of the 10 classes"),
    ({"sparsity": "l1"}, "sparsity"),
])
def test_bad_settings_are_refused_in_one_line(values, message):
    with pytest.raises(LabSettingsError, match=message):
        settings_from_dict(GSLoRASettings, values)


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "gs-lora", GSLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 5
    assert any("accuracy on forgotten classes" in table["headers"] for table in tables_of(outputs))
