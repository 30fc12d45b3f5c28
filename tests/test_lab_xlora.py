"""The X-LoRA lab experiment: the scalings route answer tokens to their task's expert more often than chance, and
the mixture of frozen experts beats the base model while training only the classifier."""

from __future__ import annotations

import pytest

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.xlora import XLoRASettings
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("xlora", XLoRASettings.quick())


def test_scalings_pick_the_tasks_own_expert_more_often_than_chance(result):
    assert result.metrics["routing_accuracy"] > 1 / 3 + 0.05


def test_the_mixture_beats_the_base_model_training_only_its_classifier(result):
    assert result.metrics["mean_accuracy_xlora"] > result.metrics["mean_accuracy_base"]
    assert result.metrics["classifier_parameters"] == 64 * 3 + 3  # one Linear from the hidden size to 3 experts
    assert set(result.figures) == {"scalings_on_mixed_input", "mean_scaling_per_task", "accuracy_per_task",
                                   "classifier_training"}


def test_a_single_task_is_refused_in_one_line():
    with pytest.raises(LabSettingsError, match="two or more different tasks"):
        settings_from_dict(XLoRASettings, {"tasks": "copy"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "xlora", XLoRASettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("routed to its expert" in table["headers"] for table in tables_of(outputs))


def test_segmented_sequences_mark_each_tokens_task_and_score_every_answer():
    from pipelines.lab.data import CharTokenizer
    from pipelines.lab.experiments._tasks import segmented

    tokenizer = CharTokenizer()
    data, owners = segmented(["copy", "sort", "add"], "test", 4, seed=0, per_sequence=3)
    assert data.input_ids.shape == owners.shape and (data.input_ids[:, 0] == tokenizer.bos_id).all()
    for row in range(4):
        real = data.attention_mask[row].bool()
        assert (owners[row][real][1:] >= 0).all() and (owners[row][~real] == -1).all()
        assert sorted(set(owners[row][real][1:].tolist())) == [0, 1, 2]
        text = tokenizer.decode(data.input_ids[row][real])
        for segment in data.prompts[row].split(" "):  # every prompt and answer, in order
            assert segment in text
        answers = data.labels[row][data.labels[row] != -100]
        assert int((answers == tokenizer.eos_id).sum()) == 3  # each answer closes with its end token
