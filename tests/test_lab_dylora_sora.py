"""The DyLoRA and SoRA lab experiments at their quick settings: each shows its method's property."""

from __future__ import annotations

import pytest

from pipelines.lab import LabResult, LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.dylora import DyLoRASettings
from pipelines.lab.experiments.sora import SoRASettings


@pytest.fixture(scope="module")
def dylora_result():
    return run_experiment("dylora", DyLoRASettings.quick())


@pytest.fixture(scope="module")
def sora_result():
    return run_experiment("sora", SoRASettings.quick())


def test_every_rank_of_one_dylora_run_beats_the_untrained_adapter(dylora_result):
    metrics = dylora_result.metrics
    ranks = range(1, DyLoRASettings.quick().max_rank + 1)
    assert all(metrics[f"dylora_accuracy_rank_{r}"] > metrics["untrained_accuracy"] + 0.05 for r in ranks)
    assert metrics["dylora_runs"] == 1 and metrics["lora_runs"] >= 1


def test_the_truncated_lora_falls_below_its_own_full_rank(dylora_result):
    metrics = dylora_result.metrics
    top = DyLoRASettings.quick().max_rank
    assert metrics["truncated_accuracy_rank_1"] < metrics[f"truncated_accuracy_rank_{top}"] - 0.1


def test_a_dylora_rank_exported_as_plain_lora_gives_the_same_logits(dylora_result):
    assert dylora_result.metrics["export_max_difference"] < 1e-5


def test_sora_live_ranks_fall_and_pruning_keeps_the_outputs(sora_result):
    metrics = sora_result.metrics
    assert metrics["live_ranks_end"] < metrics["live_ranks_start"]
    assert metrics["pruned_max_difference"] < 1e-4
    assert metrics["pruned_parameters"] < metrics["sora_parameters"]
    assert metrics["pruned_accuracy"] == metrics["sora_accuracy"] > metrics["untrained_accuracy"] + 0.05
    counts = [row["live ranks"] for row in sora_result.tables["layers"]]
    assert sum(counts) == metrics["live_ranks_end"] and all(0 <= c <= 4 for c in counts)


def test_results_save_with_their_figures_and_load_back(dylora_result, sora_result, tmp_path):
    for result, figures in ((dylora_result, {"accuracy_at_every_rank", "training_loss"}),
                            (sora_result, {"live_ranks", "threshold", "accuracy"})):
        assert set(result.figures) == figures
        folder = result.save(tmp_path / result.method)
        assert all((folder / f"{name}.png").is_file() for name in figures)
        loaded = LabResult.load(folder)
        assert loaded.metrics == pytest.approx(result.metrics) and loaded.summary == result.summary


@pytest.mark.parametrize("settings_cls, values, field", [
    (DyLoRASettings, {"max_rank": 1}, "max_rank"),
    (DyLoRASettings, {"mode": "thawed"}, "mode"),
    (DyLoRASettings, {"fixed_ranks": "2, 2"}, "fixed_ranks"),
    (SoRASettings, {"threshold": -1}, "threshold"),
    (SoRASettings, {"schedule": "cosine"}, "schedule"),
    (SoRASettings, {"steps": "nan"}, "steps"),
    (SoRASettings, {"schedule": "exp_linear", "threshold": 0}, "threshold"),
])
def test_settings_out_of_range_are_refused_naming_the_field(settings_cls, values, field):
    with pytest.raises(LabSettingsError, match=field):
        settings_from_dict(settings_cls, values)
