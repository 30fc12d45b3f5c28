"""Block-LoRA: one down-projection block shared by every chunk of the input, a LoRA whose A has tied blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    BlockLoRAConfig,
    BlockLoRALinear,
    LoRAConfig,
    LoRALinear,
    add_adapter,
    block_lora_parameter_count,
    count_parameters,
    merge,
    unmerge,
)
from tests.adapter_cases import tiny_net, token_input


def _layer(d_in=12, d_out=10, **options) -> BlockLoRALinear:
    torch.manual_seed(0)
    layer = BlockLoRALinear(nn.Linear(d_in, d_out), BlockLoRAConfig(**options))
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("d_in, num_blocks", [(12, 4), (12, 12), (13, 4), (10, 1)])
def test_block_lora_equals_a_lora_whose_down_projection_has_tied_blocks(d_in, num_blocks):
    layer = _layer(d_in=d_in, rank=3, num_blocks=num_blocks, alpha=2.0)
    block = math.ceil(d_in / num_blocks)
    assert layer.lora_A.shape == (3, block)
    lora = LoRALinear(layer.base_layer, LoRAConfig(rank=3, scale=2.0 / math.sqrt(3)))
    with torch.no_grad():
        lora.lora_A.copy_(torch.cat([layer.lora_A] * num_blocks, dim=1)[:, :d_in])
        lora.lora_B.copy_(layer.lora_B)
    x = torch.randn(2, 5, d_in)
    torch.testing.assert_close(layer(x), lora(x))
    torch.testing.assert_close(layer.get_delta_weight(), lora.get_delta_weight())
    down, up = layer.export_lora()
    torch.testing.assert_close(up @ down, layer.get_delta_weight())


def test_the_update_sums_the_input_chunks_before_one_small_product():
    layer = _layer(d_in=12, rank=2, num_blocks=3, alpha=1.0, rank_scaling="linear")
    x = torch.randn(4, 12)
    chunks = x[:, 0:4] + x[:, 4:8] + x[:, 8:12]
    expected = layer.base_layer(x) + 0.5 * chunks @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_trainable_parameters_follow_the_formula_and_undercut_lora():
    model = tiny_net()
    add_adapter(model, BlockLoRAConfig(rank=4, num_blocks=4, target_modules=["fc1", "fc2"]), name="block")
    # fc1: 16 -> 32, fc2: 32 -> 16, in two blocks; d_out * r + r * d_in / n each.
    expected = 2 * ((32 * 4 + 4 * 16 // 4) + (16 * 4 + 4 * 32 // 4))
    assert count_parameters(model, "block") == expected
    assert expected == 2 * (block_lora_parameter_count(16, 32, 4, 4) + block_lora_parameter_count(32, 16, 4, 4))
    add_adapter(model, LoRAConfig(rank=4, target_modules=["fc1", "fc2"]), name="lora")
    assert count_parameters(model, "lora") == 2 * ((16 + 32) * 4 + (32 + 16) * 4)
    assert count_parameters(model, "block") < count_parameters(model, "lora")
    assert block_lora_parameter_count(13, 10, 2, 4) == 10 * 2 + 2 * 4
    assert block_lora_parameter_count(16, 32, 4, 4, share_down=False) == (16 + 32) * 4


def test_without_sharing_it_is_clip_lora():
    layer = _layer(d_in=12, rank=4, num_blocks=3, share_down=False, alpha=1.0)
    assert layer.lora_A.shape == (4, 12)
    x = torch.randn(3, 12)
    expected = layer.base_layer(x) + (1.0 / 2.0) * x @ (layer.lora_B @ layer.lora_A).T  # alpha / sqrt(r)
    torch.testing.assert_close(layer(x), expected)


def test_defaults_follow_clip_lora_and_the_init_bound_follows_the_fan_in():
    config = BlockLoRAConfig()
    assert (config.rank, config.alpha, config.dropout, config.num_blocks) == (2, 1.0, 0.25, 8)
    assert config.scale == pytest.approx(1 / math.sqrt(2))
    torch.manual_seed(0)
    wide = BlockLoRALinear(nn.Linear(64, 8), BlockLoRAConfig(rank=16, num_blocks=4))
    assert wide.lora_A.abs().max() <= 1 / math.sqrt(64) < 1.5 * wide.lora_A.abs().max()
    assert torch.equal(wide.lora_B, torch.zeros(8, 16))
    block = BlockLoRALinear(nn.Linear(64, 8), BlockLoRAConfig(rank=16, num_blocks=4, down_init_fan_in="block"))
    assert block.lora_A.abs().max() <= 1 / math.sqrt(16) < 1.5 * block.lora_A.abs().max()


def test_dropout_acts_only_in_training_mode():
    layer = _layer(d_in=12, rank=2, num_blocks=3, dropout=0.5)
    x = torch.randn(64, 12)
    evaluated = layer(x)
    layer.train()
    torch.manual_seed(3)
    assert not torch.allclose(layer(x), evaluated)
    layer.eval()
    assert torch.equal(layer(x), evaluated)


def test_merge_and_unmerge_on_a_model():
    model = tiny_net()
    model.eval()
    add_adapter(model, BlockLoRAConfig(rank=2, num_blocks=4, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = token_input()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    unmerge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, field", [
    ({"rank": 0}, "rank"), ({"num_blocks": 0}, "num_blocks"), ({"num_blocks": 2.5}, "num_blocks"),
    ({"alpha": float("inf")}, "alpha"), ({"rank_scaling": "log"}, "rank_scaling"), ({"dropout": -0.1}, "dropout"),
    ({"share_down": 1}, "share_down"), ({"down_init_fan_in": "output"}, "down_init_fan_in"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"Block-LoRA {field}"):
        BlockLoRAConfig(**options)
