"""The Hot-Swap MarkBoard lab experiment: the signature reads back before and after a swap of branches, the clean
accuracy stays, an unmarked model reads nothing, and obfuscation hurts only the base stripped of its branches."""

from __future__ import annotations

import pytest
import torch

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.markboard import MarkBoardSettings, owner_triggers, stamp
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("markboard", MarkBoardSettings.quick())


def test_the_signature_reads_back_before_and_after_a_swap_without_training(result):
    m = result.metrics
    assert m["bit_accuracy_signed"] >= 0.75 and m["bit_accuracy_swapped"] >= 0.75
    assert m["bit_accuracy_random_swaps"] >= 0.75
    assert m["bits_read_unmarked"] == 0
    rows = result.tables["signatures"]
    assert rows[0]["set"] != rows[1]["set"] and len(rows) == 2 + MarkBoardSettings.quick().swaps
    assert {"signature_before_and_after_swap", "clean_accuracy", "random_swaps"} == set(result.figures)


def test_the_clean_accuracy_stays_and_obfuscation_hurts_only_the_stripped_base(result):
    m = result.metrics
    for key in ("clean_accuracy_signed", "clean_accuracy_swapped", "clean_accuracy_random_swaps"):
        assert m[key] > m["clean_accuracy_base"] - 0.1
    assert m["obfuscation_max_difference"] < 1e-3
    assert m["clean_accuracy_obfuscated"] == pytest.approx(m["clean_accuracy_swapped"], abs=0.01)
    assert m["clean_accuracy_stripped"] < m["clean_accuracy_obfuscated"] - 0.15


def test_a_trigger_covers_its_patch_and_blends_its_pattern_elsewhere():
    patterns, cells = owner_triggers(3, seed=0)
    assert len(set(cells)) == 3 and patterns.shape == (3, 3, 16, 16)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stamped = stamp(images, patterns[0], cells[0], 0.3)
    row, col = divmod(cells[0], 4)
    box = (..., slice(4 * row, 4 * row + 4), slice(4 * col, 4 * col + 4))
    torch.testing.assert_close(stamped[box], patterns[0][box].expand_as(stamped[box]))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4 * row:4 * row + 4, 4 * col:4 * col + 4] = False
    torch.testing.assert_close(stamped[..., outside], (0.7 * images + 0.3 * patterns[0])[..., outside])


def test_more_bits_than_image_patches_are_refused():
    with pytest.raises(LabSettingsError, match="bits"):
        settings_from_dict(MarkBoardSettings, {"bits": "17"})
    with pytest.raises(LabSettingsError, match="training"):
        settings_from_dict(MarkBoardSettings, {"training": "together"})


def test_the_panel_runs_its_quick_setting_through_the_app(studio_server):
    client, workspace = studio_server.session()
    outputs = run_panel(client, workspace, "markboard", MarkBoardSettings.quick())
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 3
    assert any("bit accuracy" in table["headers"] for table in tables_of(outputs))
