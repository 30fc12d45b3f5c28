"""The Granite-speech lab experiment: transcripts in speech mode, the base LLM's logits exactly in text mode."""

from __future__ import annotations

import pytest
import torch

from pipelines.lab import LabSettingsError, run_experiment, settings_from_dict
from pipelines.lab.experiments.granite_speech import (
    DOWNSAMPLE,
    WINDOW,
    GraniteSpeechSettings,
    character_error_rate,
    letter_tones,
    utterances,
)
from tests.lab_client import figures_of, record_of, run_panel, tables_of


@pytest.fixture(scope="module")
def result():
    return run_experiment("granite-speech", GraniteSpeechSettings.quick())


def test_text_mode_gives_the_base_llms_logits_exactly(result):
    m = result.metrics
    assert m["text_mode_max_abs_diff"] == 0.0 and m["text_mode_identical"] == 1.0
    assert m["forced_lora_max_abs_diff"] > 0.1
    assert all(row["max |logit diff|, text mode"] == 0.0 for row in result.tables["text_mode"])


def test_the_speech_lora_transcribes_better_than_training_without_it(result):
    m = result.metrics
    assert m["cer_speech"] < m["cer_without_lora"]
    assert m["cer_speech"] < 0.8
    assert {"character_error_rate", "training", "example_audio", "text_mode"} == set(result.figures)


def test_synthetic_audio_is_whole_windows_of_noisy_letter_chords():
    settings = GraniteSpeechSettings(noise=0.0)
    speech = utterances(6, settings, "test")
    assert speech.features.shape[1] % WINDOW == 0 and speech.features.shape[1] // DOWNSAMPLE >= settings.max_letters
    assert all(settings.min_letters <= len(t) <= settings.max_letters for t in speech.transcripts)
    tones = letter_tones(settings.feature_bins)
    first = speech.features[0, 1]  # inside the first letter: its chord times the envelope
    expected = tones["abcdefghij".index(speech.transcripts[0][0])]
    assert torch.allclose(first / first.max(), expected / expected.max(), atol=1e-5)
    assert speech.features[0, -1].abs().max() == 0  # silence after the word
    noisy = utterances(6, GraniteSpeechSettings(), "test")
    assert torch.equal(noisy.features, utterances(6, GraniteSpeechSettings(), "test").features)


def test_character_error_rate_counts_edits_over_reference_letters():
    assert character_error_rate(["abc", "ab"], ["abc", "abd"]) == 1 / 6
    assert character_error_rate(["", "xyz"], ["ab", "xz"]) == 3 / 4


@pytest.mark.parametrize("values, message", [({"min_letters": 6, "max_letters": 3}, "min_letters"),
                                             ({"duration_jitter": 4, "frames_per_letter": 4}, "duration_jitter"),
                                             ({"noise": -1.0}, "noise")])
def test_bad_settings_are_refused(values, message):
    with pytest.raises(LabSettingsError, match=message):
        settings_from_dict(GraniteSpeechSettings, values)


def test_the_panel_runs_through_the_app(studio_server):
    client, workspace = studio_server.session()
    tiny = GraniteSpeechSettings(encoder_steps=2, speech_steps=2, train_utterances=16, test_utterances=4)
    outputs = run_panel(client, workspace, "granite-speech", tiny)
    assert record_of(outputs)["status"] == "done"
    assert len(figures_of(outputs)) == 4
    assert any("CER" in table["headers"] for table in tables_of(outputs))
