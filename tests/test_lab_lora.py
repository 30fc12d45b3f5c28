"""The LoRA lab experiment: its quick run trains adapters that beat the untrained one, and merges exactly."""

from __future__ import annotations

import pytest

from pipelines.lab import EXPERIMENTS, LabSettingsError, Progress, run_experiment, settings_from_dict


@pytest.fixture(scope="module")
def quick_result():
    reports = []
    settings = EXPERIMENTS["lora"].settings_cls.quick()
    result = run_experiment("lora", settings, Progress(lambda f, m: reports.append((f, m)), interval=0.0))
    return result, reports


def test_trained_adapters_beat_the_untrained_one_and_merging_changes_nothing(quick_result):
    result, _ = quick_result
    ranks = result.settings["ranks"]
    untrained = result.metrics["untrained_accuracy"]
    for rank in ranks:
        assert result.metrics[f"accuracy_rank_{rank}"] > untrained + 0.1
    assert result.metrics["best_accuracy"] > result.metrics["head_only_accuracy"]
    assert result.metrics["merge_max_difference"] < 1e-4


def test_trainable_parameters_grow_linearly_with_the_rank(quick_result):
    result, _ = quick_result
    low, high = sorted(result.settings["ranks"])
    ratio = result.metrics[f"parameters_rank_{high}"] / result.metrics[f"parameters_rank_{low}"]
    assert ratio == high / low


def test_the_result_has_its_figures_tables_and_a_summary_with_the_numbers(quick_result, tmp_path):
    result, reports = quick_result
    assert set(result.figures) == {"accuracy_vs_rank", "parameters_vs_rank", "training_loss"}
    assert [row["rank"] for row in result.tables["sweep"]] == [0, *sorted(result.settings["ranks"])]
    assert f"{result.metrics['best_accuracy']:.1%}" in result.summary
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    folder = result.save(tmp_path / "lora")
    assert sorted(p.name for p in folder.iterdir()) == ["accuracy_vs_rank.png", "parameters_vs_rank.png",
                                                         "result.json", "training_loss.png"]


def test_repeated_ranks_are_refused():
    with pytest.raises(LabSettingsError, match="ranks must not repeat a rank"):
        settings_from_dict(EXPERIMENTS["lora"].settings_cls, {"ranks": "2, 2"})
