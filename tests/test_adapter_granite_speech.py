"""Granite-speech's speech-mode LoRA: on with audio features, the base model bit for bit without, through generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    SpeechLoRAConfig,
    add_adapter,
    forced_mode,
    layers_of,
    load_adapter,
    remove_adapter,
    save_adapter,
    trainable_parameters,
)
from tests.adapter_cases import TinySpeechNet, speech_input, tiny_speech_net

LLM_QV = r"model\.language_model\..*\.(?:q_proj|v_proj)"
AUDIO_TOKEN = 40


def _randomize(model, name="default", seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model, name):
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))


def tiny_granite():
    """transformers' GraniteSpeechForConditionalGeneration from tiny configs (random weights, eager attention)."""
    from transformers import (
        Blip2QFormerConfig,
        GraniteSpeechConfig,
        GraniteSpeechForConditionalGeneration,
        LlamaConfig,
    )

    text = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)
    config = GraniteSpeechConfig(
        text_config=text.to_dict(),
        encoder_config={"input_dim": 12, "num_layers": 2, "hidden_dim": 16, "feedforward_mult": 2, "num_heads": 2,
                        "dim_head": 8, "output_dim": 6, "context_size": 15, "max_pos_emb": 16, "dropout": 0.0,
                        "conv_kernel_size": 3, "conv_expansion_factor": 2},
        projector_config=Blip2QFormerConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, encoder_hidden_size=16).to_dict(),
        audio_token_index=AUDIO_TOKEN, window_size=15, downsample_rate=5, tie_word_embeddings=False,
        has_lora_adapter=False)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GraniteSpeechForConditionalGeneration(config)
    model.eval()
    return model


def _speech_prompt(batch=2):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(batch, 15, 12, generator=generator)
    ids = torch.tensor([[1, 7, 8] + [AUDIO_TOKEN] * 3 + [9]] * batch)
    return ids, features


def _text_prompt():
    return torch.tensor([[1, 5, 6, 7, 8, 9, 10], [1, 11, 12, 13, 0, 0, 0]]), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])


# -- the switch -----------------------------------------------------------------------------------------------------


def test_text_mode_of_a_granite_speech_model_is_the_base_model_bit_for_bit():
    model = tiny_granite()
    ids, mask = _text_prompt()
    base = model(input_ids=ids, attention_mask=mask).logits
    speech_ids, features = _speech_prompt()
    base_speech = model(input_ids=speech_ids, input_features=features).logits
    add_adapter(model, SpeechLoRAConfig(rank=4, alpha=8.0, target_modules=LLM_QV), name="speech")
    _randomize(model, "speech")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
    speech = model(input_ids=speech_ids, input_features=features).logits
    assert not torch.allclose(speech, base_speech)
    # Between calls the layers rest in text mode: the language model on its own is the base one.
    language_model = model.model.language_model
    hidden = language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    remove_adapter(model, "speech")
    assert torch.equal(language_model(input_ids=ids, attention_mask=mask).last_hidden_state, hidden)


def test_speech_mode_adds_alpha_over_rank_times_b_a_x():
    torch.manual_seed(0)
    model = TinySpeechNet()
    add_adapter(model, SpeechLoRAConfig(rank=3, alpha=6.0, target_modules=["fc1"]), name="speech")
    _randomize(model, "speech")
    layer = layers_of(model)["blocks.0.fc1"][0]
    seen = {}
    layer.register_forward_hook(lambda module, args, out: seen.update(x=args[0], y=out))
    model(**speech_input())
    x = seen["x"]
    base = layer.base_layer
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(seen["y"], expected)
    model(speech_input()["x"])
    assert torch.equal(seen["y"], base(seen["x"]))


def test_features_given_by_position_switch_too():
    model = tiny_speech_net()
    inputs = speech_input()
    add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1"]))
    _randomize(model)
    assert torch.equal(model(inputs["x"], inputs["input_features"]), model(**inputs))
    assert torch.equal(model(inputs["x"], None), model(inputs["x"]))


def _record_modes(model):
    layer = next(iter(layers_of(model, "speech").values()))[0]
    modes = []
    layer.register_forward_hook(lambda module, args, out: modes.append(module.applies))
    return modes


def test_generate_decodes_a_speech_prompt_in_speech_mode_to_the_end():
    model = tiny_granite()
    add_adapter(model, SpeechLoRAConfig(rank=4, target_modules=LLM_QV), name="speech")
    _randomize(model, "speech")
    modes = _record_modes(model)
    ids, features = _speech_prompt(1)
    model.generate(input_ids=ids, input_features=features, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    assert len(modes) == 4 and all(modes)  # one call per step; only the first is given the audio
    modes.clear()
    text, _ = _text_prompt()
    model.generate(input_ids=text[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(modes) == 4 and not any(modes)


def test_without_the_decoding_rule_a_continued_sequence_is_text():
    model = tiny_granite()
    add_adapter(model, SpeechLoRAConfig(rank=4, target_modules=LLM_QV, keep_mode_while_decoding=False),
                name="speech")
    modes = _record_modes(model)
    ids, features = _speech_prompt(1)
    model.generate(input_ids=ids, input_features=features, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                   pad_token_id=0)
    assert modes == [True, False, False]


def test_forced_mode_overrides_the_arguments():
    model = tiny_speech_net()
    inputs = speech_input()
    base_text, base_speech = model(inputs["x"]), model(**inputs)
    add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1", "fc2"]), name="speech")
    _randomize(model, "speech")
    speech = model(**inputs)
    with forced_mode(model, speech=True):
        assert not torch.allclose(model(inputs["x"]), base_text)
    with forced_mode(model, speech=False):
        assert torch.equal(model(**inputs), base_speech)
    assert torch.equal(model(**inputs), speech) and torch.equal(model(inputs["x"]), base_text)
    with pytest.raises(AdapterError, match="speech=True or speech=False"):
        with forced_mode(model, speech=1):
            pass


def test_a_failing_call_leaves_the_layers_in_text_mode():
    model = tiny_speech_net()
    add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1"]), name="speech")
    inputs = speech_input()
    with pytest.raises(RuntimeError):
        model(inputs["x"][:, :, :3], input_features=inputs["input_features"])
    assert not any(layer.applies for stack in layers_of(model, "speech").values() for layer in stack)


def test_remove_takes_the_hooks_away_and_load_puts_them_back(tmp_path):
    model = tiny_speech_net()
    inputs = speech_input()
    add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1"]), name="speech")
    _randomize(model, "speech")
    expected = model(**inputs)
    save_adapter(model, tmp_path / "s", "speech")
    remove_adapter(model, "speech")
    assert not model._forward_pre_hooks and not model._forward_hooks
    load_adapter(model, tmp_path / "s")
    assert torch.equal(model(**inputs), expected)
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


# -- bad input ---------------------------------------------------------------------------------------------------


class NoAudio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc1(x)


def test_a_model_whose_forward_takes_no_audio_is_refused_and_left_untouched():
    model = NoAudio()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="takes no argument 'input_features'"):
        add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1"]))
    assert isinstance(model.fc1, nn.Linear) and not model._forward_pre_hooks
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, value, message", [
    ("features_argument", "input features", "features_argument"), ("features_argument", "", "features_argument"),
    ("rank", 0, "rank"), ("alpha", -1.0, "alpha"), ("dropout", float("inf"), "dropout"),
    ("keep_mode_while_decoding", "yes", "keep_mode_while_decoding"),
])
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(AdapterError, match=message):
        SpeechLoRAConfig(**{field: value}, target_modules=["fc1"])


def test_the_speech_adapter_does_not_merge():
    from pipelines.adapters import merge

    model = tiny_speech_net()
    add_adapter(model, SpeechLoRAConfig(rank=2, target_modules=["fc1"]))
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge(model)
