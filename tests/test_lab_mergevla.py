"""The MergeVLA lab experiment: task arithmetic fails, TALL masks and the router recover, masks are sparse."""

from __future__ import annotations

import pytest
import torch

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.data import token_classification_task
from pipelines.lab.experiments.mergevla import MergeVLASettings, vocabulary_block
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("mergevla", MergeVLASettings.quick())


def test_task_arithmetic_fails_where_masks_and_the_router_recover(result):
    m = result.metrics
    assert m["individual_accuracy"] > 0.9
    assert m["task_arithmetic_accuracy"] < m["individual_accuracy"] - 0.15
    assert m["masked_accuracy"] > m["task_arithmetic_accuracy"] + 0.15
    assert m["routed_relative_accuracy"] > m["task_arithmetic_accuracy"]
    assert m["router_relative_accuracy"] > 1 / len(MergeVLASettings.quick().skills)
    assert 0 < m["mask_density"] < 1
    assert {"accuracy_per_skill", "router", "mask_density", "lambda_sweep"} <= set(result.figures)
    assert len(result.tables["skills"]) == len(MergeVLASettings.quick().skills)


def test_each_skill_sees_only_its_block_of_the_vocabulary():
    data = token_classification_task("contains-pattern", "test", n=64)
    for block in range(4):
        seen = vocabulary_block(data, block)
        content = seen.inputs[seen.inputs >= 4]
        assert int(content.min()) >= 4 + 7 * block and int(content.max()) < 4 + 7 * (block + 1)
        assert torch.equal(seen.labels, data.labels)
        assert torch.equal(seen.inputs < 4, data.inputs < 4)  # CLS and padding where they were


def test_more_skills_than_vocabulary_blocks_are_refused():
    with pytest.raises(LabSettingsError, match="skills must list 2 to 4"):
        settings_from_dict(MergeVLASettings, {"skills": ["majority"] * 5})
    with pytest.raises(LabSettingsError, match="skills"):
        settings_from_dict(MergeVLASettings, {"skills": ["majority", "first-equals-last"]})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "mergevla", MergeVLASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("task arithmetic" in table["headers"] for table in tables_of(outputs))
