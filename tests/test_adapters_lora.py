"""LoRA and rank-constrained adaptation layers: forward, update, merge/unmerge, export, checkpoint state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    LoRAConfig,
    LoRALinear,
    RankConstrainedConfig,
    RankConstrainedLinear,
    adapter_layers,
    inject_adapters,
    remove_adapters,
)


def _base(d_in: int = 12, d_out: int = 10, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).to(dtype)


def _randomize(layer: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.normal_()


def test_lora_starts_as_identity_and_adds_scaled_update():
    base = _base()
    layer = LoRALinear(base, LoRAConfig(rank=4, scale=0.5))
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), base(x))  # B starts at zero
    _randomize(layer)
    expected = base(x) + 0.5 * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in layer.parameters(recurse=False))


def test_rca_update_equals_alpha_times_BA_at_rank_r_over_alpha():
    layer = RankConstrainedLinear(_base(), RankConstrainedConfig(rank=64, alpha=2))
    assert layer.lora_A.shape == (32, 12) and layer.lora_B.shape == (10, 32)
    _randomize(layer)
    torch.testing.assert_close(layer.get_delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), 2.0 * x @ (layer.lora_B @ layer.lora_A).T,
                               rtol=1e-4, atol=1e-4)


def test_rca_export_bakes_alpha_into_lora_B():
    layer = RankConstrainedLinear(_base(), RankConstrainedConfig(rank=8, alpha=4))
    _randomize(layer)
    a, b = layer.export_lora()
    assert a.shape == (2, 12)
    torch.testing.assert_close(b, 4.0 * layer.lora_B.detach())
    torch.testing.assert_close(b @ a, layer.get_delta_weight())


@pytest.mark.parametrize("rank,alpha", [(64, 3), (64, 0), (2, 4)])
def test_rca_rejects_alpha_that_does_not_divide_the_rank(rank, alpha):
    with pytest.raises(ValueError):
        RankConstrainedConfig(rank=rank, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_unmerge_restores_the_base_weight_exactly(dtype):
    base = _base(dtype=dtype)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, LoRAConfig(rank=4))
    _randomize(layer)
    x = torch.randn(2, 3, 12, dtype=dtype)
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.equal(base.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=2e-2, atol=2e-2)
    layer.unmerge()
    assert torch.equal(base.weight, original)
    assert torch.equal(layer(x), unmerged_out)


def test_inject_and_remove_put_the_original_modules_back():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)))
    originals = (model[0], model[2][0])
    layers = inject_adapters(model, ["0", "2.0"], lambda base: LoRALinear(base, LoRAConfig(rank=2)))
    assert set(layers) == {"0", "2.0"} and set(adapter_layers(model)) == {"0", "2.0"}
    with pytest.raises(ValueError):
        inject_adapters(model, ["0"], lambda base: LoRALinear(base))
    remove_adapters(model)
    assert model[0] is originals[0] and model[2][0] is originals[1]
    assert adapter_layers(model) == {}


def test_adapter_state_round_trips_and_rejects_a_mismatch():
    first = LoRALinear(_base(), LoRAConfig(rank=3))
    _randomize(first)
    second = LoRALinear(_base(), LoRAConfig(rank=3))
    second.load_adapter_state_dict(first.adapter_state_dict())
    x = torch.randn(4, 12)
    assert torch.equal(first(x), second(x))
    with pytest.raises(ValueError):
        LoRALinear(_base(), LoRAConfig(rank=5)).load_adapter_state_dict(first.adapter_state_dict())


def test_disabled_layer_is_the_base():
    layer = LoRALinear(_base(), LoRAConfig(rank=2))
    _randomize(layer)
    x = torch.randn(3, 12)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_rank_pattern_gives_named_modules_their_own_rank():
    from pipelines.adapters import AdapterError, add_adapter
    from tests.adapter_cases import tiny_net

    model = tiny_net()
    config = LoRAConfig(rank=4, rank_pattern={"blocks.0.fc1": 2, "fc2": 3}, target_modules=["fc1", "fc2"])
    add_adapter(model, config)
    assert model.blocks[0]["fc1"].lora_A.shape[0] == 2
    assert model.blocks[1]["fc1"].lora_A.shape[0] == 4
    assert model.blocks[0]["fc2"].lora_A.shape[0] == 3 and model.blocks[1]["fc2"].lora_A.shape[0] == 3
    for bad in ({"fc1": 0}, {"fc1": True}, {"": 2}, ["fc1"]):
        with pytest.raises(AdapterError, match="rank_pattern"):
            LoRAConfig(rank=4, rank_pattern=bad, target_modules=["fc1"])
