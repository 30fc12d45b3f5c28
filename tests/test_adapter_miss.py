"""MiSS through the registry: the same forward and merge as PEFT's own MiSS, for every init mode."""

from __future__ import annotations

import peft
import pytest
import torch

from pipelines.adapters import (
    AdapterError,
    LoRAConfig,
    MissConfig,
    adapter_names,
    add_adapter,
    count_parameters,
    disabled,
    layers_of,
    merge,
    miss_parameter_count,
    remove_adapter,
    unmerge,
)
from tests.adapter_cases import tiny_net, token_input

TARGETS = ["fc1", "fc2"]  # 16 -> 32 and 32 -> 16, in two blocks
MODES = [
    ({"init_weights": True}, 4),
    ({"init_weights": "bat"}, 4),
    ({"init_weights": "mini", "mini_r": 4}, 8),
    ({"init_weights": False}, 4),
]


def _ours_and_peft(options: dict, rank: int):
    """Our MiSS and PEFT's get_peft_model on two copies of one model, with the same random blocks."""
    ours, theirs = tiny_net(), tiny_net()
    ours.eval()
    theirs.eval()
    add_adapter(ours, MissConfig(rank=rank, **options, target_modules=TARGETS))
    theirs = peft.get_peft_model(theirs, MissConfig(rank=rank, **options).peft_config(target_modules=TARGETS))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module, stack in layers_of(ours).items():
            block = stack[0].block
            block.copy_(0.2 * torch.randn(block.shape, generator=generator))
            theirs.base_model.model.get_submodule(module).miss_block["default"].copy_(block)
    return ours, theirs


@pytest.mark.parametrize("options, rank", MODES, ids=lambda v: str(v))
def test_forward_equals_peft_get_peft_model_with_the_same_blocks(options, rank):
    ours, theirs = _ours_and_peft(options, rank)
    x = token_input()
    expected = theirs(x)
    assert torch.equal(ours(x), expected)
    with disabled(ours), theirs.disable_adapter():
        assert torch.equal(ours(x), theirs(x))
        assert not torch.allclose(ours(x), expected)


@pytest.mark.parametrize("options, rank", MODES, ids=lambda v: str(v))
def test_merge_matches_peft_and_unmerge_restores_the_weights_exactly(options, rank):
    ours, theirs = _ours_and_peft(options, rank)
    x = token_input()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    expected = ours(x)
    merge(ours)
    theirs.merge_adapter()
    for module in layers_of(ours):
        ours_weight = ours.get_submodule(module).original_module().weight
        peft_weight = theirs.base_model.model.get_submodule(module).get_base_layer().weight
        torch.testing.assert_close(ours_weight, peft_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)
    unmerge(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert torch.equal(ours(x), expected)


def test_identity_at_init_for_every_zero_initialised_mode():
    for options, rank in MODES[:3]:
        model = tiny_net()
        x = token_input()
        base = model(x)
        add_adapter(model, MissConfig(rank=rank, **options, target_modules=TARGETS))
        assert torch.equal(model(x), base), options


@pytest.mark.parametrize("options, rank", MODES, ids=lambda v: str(v))
def test_trainable_parameters_follow_the_mode(options, rank):
    model = tiny_net()
    add_adapter(model, MissConfig(rank=rank, **options, target_modules=TARGETS))
    mode, mini_r = options["init_weights"], options.get("mini_r", 1)
    expected = 2 * sum(miss_parameter_count(d_in, d_out, rank, mode, mini_r) for d_in, d_out in [(16, 32), (32, 16)])
    assert count_parameters(model) == expected
    assert expected == (2 * rank * 4 * 2 if mode == "mini" else 2 * rank * (32 + 16))


def test_the_base_module_is_held_once():
    model = tiny_net()
    add_adapter(model, MissConfig(rank=4, target_modules=TARGETS))
    keys = list(model.state_dict())
    assert "blocks.0.fc1.miss.base_layer.weight" in keys
    assert not any(k.endswith("fc1.base_layer.weight") and ".miss." not in k for k in keys)
    assert sum(k.endswith("fc1.miss.miss_block.default") for k in keys) == 2
    layer = model.blocks[0]["fc1"]
    assert layer.base_layer is layer.miss.base_layer


def test_miss_stacks_with_another_adapter_and_removal_restores_each():
    model = tiny_net()
    model.eval()
    x = token_input()
    base = model(x)
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="lora")
    add_adapter(model, MissConfig(rank=4, target_modules=TARGETS), name="miss")
    with torch.no_grad():
        for stack in layers_of(model).values():
            for layer in stack:
                for p in layer.adapter_parameters():
                    p.normal_(std=0.1)
    both = model(x)
    remove_adapter(model, "lora")
    assert adapter_names(model) == ["miss"] and model.blocks[0]["fc1"].base_layer is not None
    only_miss = model(x)
    assert not torch.allclose(only_miss, both)
    remove_adapter(model, "miss")
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("options, match", [
    ({"rank": 20}, "exceeds the 16 input features"),
    ({"rank": 3, "init_weights": "bat"}, "multiples of the rank 3"),
    ({"rank": 4, "init_weights": "mini", "mini_r": 5}, "multiple of mini_r 5"),
])
def test_a_layer_the_mode_cannot_fit_is_refused_and_the_model_untouched(options, match):
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        add_adapter(model, MissConfig(**options, target_modules=TARGETS))
    assert adapter_names(model) == [] and list(model.state_dict()) == list(before)
    assert all(p.requires_grad for p in model.parameters())


def test_bat_must_be_the_first_adapter_on_a_module():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="lora")
    with pytest.raises(AdapterError, match="first adapter"):
        add_adapter(model, MissConfig(rank=4, init_weights="bat", target_modules=TARGETS), name="bat")
    assert adapter_names(model) == ["lora"]


@pytest.mark.parametrize("options, field", [
    ({"rank": 0}, "rank"), ({"mini_r": -1}, "mini_r"), ({"dropout": float("nan")}, "dropout"),
    ({"init_weights": "pissa"}, "init_weights"), ({"init_weights": 1}, "init_weights"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"MiSS {field}"):
        MissConfig(**options)
