"""DV-LoRA (EndoDAC): the update diag(v) B diag(u) A, the official initialisation, and the two training phases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    DVLoRAConfig,
    DVLoRALinear,
    LoRAConfig,
    add_adapter,
    count_parameters,
    get_phase,
    layers_of,
    merge,
    phase_at_step,
    set_phase,
    trainable_parameters,
    unmerge,
)
from tests.adapter_cases import tiny_net, token_input


def _layer(rank=3, d_in=12, d_out=10, **options) -> DVLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    layer = DVLoRALinear(base, DVLoRAConfig(rank=rank, **options))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_update_is_alpha_over_r_times_diag_v_B_diag_u_A():
    layer = _layer(rank=3, alpha=6.0)
    x = torch.randn(2, 5, 12)
    a, b, u, v = (t.detach() for t in (layer.lora_A, layer.lora_B, layer.lora_u, layer.lora_v))
    update = 2.0 * torch.diag(v) @ b @ torch.diag(u) @ a
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ update.T)
    torch.testing.assert_close(layer.get_delta_weight(), update)
    down, up = layer.export_lora()
    torch.testing.assert_close(up @ down, update)


def test_new_adapter_draws_the_official_initialisation_and_changes_nothing():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    torch.manual_seed(7)
    layer = DVLoRALinear(base, DVLoRAConfig(rank=4))
    # EndoDAC's DVLinear.reset_parameters: A, then (B zero) U of shape (r, 1), V of shape (d_out, 1), all with
    # nn.Linear's Kaiming-uniform (a = sqrt(5)).
    torch.manual_seed(7)
    expected = [torch.empty(4, 12), torch.empty(4, 1), torch.empty(10, 1)]
    for t in expected:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected[0])
    assert torch.equal(layer.lora_u, expected[1].flatten()) and torch.equal(layer.lora_v, expected[2].flatten())
    assert torch.equal(layer.lora_B, torch.zeros(10, 4))
    assert layer.lora_u.abs().max() <= 1.0 and layer.lora_A.abs().max() <= 1 / math.sqrt(12)
    assert layer.scale == 1.0  # alpha = rank, as EndoDAC builds every DVLinear
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), base(x))


def test_with_unit_vectors_phase_one_is_plain_lora():
    layer = _layer(rank=3, vector_init="ones", alpha=1.5)
    x = torch.randn(4, 12)
    expected = layer.base_layer(x) + 0.5 * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), expected)


def _model_with_dv(**options):
    model = tiny_net()
    add_adapter(model, DVLoRAConfig(rank=4, target_modules=["fc1", "fc2"], **options), name="dv")
    add_adapter(model, LoRAConfig(rank=2, target_modules=["proj_in"]), name="other")
    return model


def test_phase_two_trains_exactly_the_vectors_and_phase_one_the_matrices():
    model = _model_with_dv()
    layers = [stack[0] for stack in layers_of(model, "dv").values()]
    assert len(layers) == 4
    assert get_phase(model, "dv") == 1
    assert {id(p) for p in trainable_parameters(model, "dv")} == {
        id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}

    set_phase(model, "dv", 2)
    vectors = {id(p) for layer in layers for p in (layer.lora_u, layer.lora_v)}
    assert {id(p) for p in trainable_parameters(model, "dv")} == vectors
    # Out of the whole model, only the vectors and the other adapter's own parameters still need gradients.
    other = {id(p) for p in trainable_parameters(model, "other")}
    assert {id(p) for p in model.parameters() if p.requires_grad} == vectors | other
    # 4 rank entries plus one per output feature, for fc1 (16 -> 32) and fc2 (32 -> 16) of two blocks.
    assert count_parameters(model, "dv") == 2 * ((4 + 32) + (4 + 16))

    with torch.no_grad():  # as after phase 1: with B still zero, u and v get no gradient
        for layer in layers:
            layer.lora_B.normal_()
    model(token_input()).square().sum().backward()
    for layer in layers:
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
        assert layer.lora_v.grad is not None and layer.lora_v.grad.abs().sum() > 0

    set_phase(model, "dv", 1)
    assert count_parameters(model, "dv") == 2 * (4 * 16 + 32 * 4 + 4 * 32 + 16 * 4)
    assert all(not layer.lora_u.requires_grad and layer.lora_A.requires_grad for layer in layers)


def test_phase_at_step_switches_after_the_warmup():
    model = _model_with_dv(warmup_steps=3)
    assert [phase_at_step(model, "dv", step) for step in range(5)] == [1, 1, 1, 2, 2]
    assert get_phase(model, "dv") == 2


def test_a_bad_phase_or_another_method_is_refused_and_nothing_changes():
    model = _model_with_dv()
    with pytest.raises(AdapterError, match="phase must be 1"):
        set_phase(model, "dv", 3)
    assert get_phase(model, "dv") == 1
    with pytest.raises(AdapterError, match="not a DV-LoRA"):
        set_phase(model, "other", 2)
    with pytest.raises(AdapterError, match="no adapter named"):
        set_phase(model, "missing", 2)


def test_merge_in_phase_two_keeps_outputs_and_unmerges_exactly():
    model = _model_with_dv()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in [stack[0] for stack in layers_of(model, "dv").values()]:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
    set_phase(model, "dv", 2)
    x = token_input()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model(x)
    merge(model, "dv")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    unmerge(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, field", [
    ({"rank": 0}, "rank"), ({"rank": True}, "rank"), ({"alpha": float("nan")}, "alpha"), ({"alpha": 0.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"vector_init": "zeros"}, "vector_init"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"DV-LoRA {field}"):
        DVLoRAConfig(**options)
