"""SMoRA's equations on random tensors: the balancing bias update on known counts, the gates as the official code
computes them (bias in the gate values, or not), the layer against its explicit formula; and its bad input."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters import (
    AdapterError,
    SMoRAConfig,
    SMoRALinear,
    adapter_names,
    add_adapter,
    load_adapter,
    save_adapter,
    smora_rank_activations,
    smora_rank_bias,
    trainable_parameters,
)
from pipelines.adapters.smora import smora_bias_update, smora_gates
from tests.adapter_cases import tiny_net, token_input


def _randomize(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def test_bias_update_on_known_counts():
    # Ranks 0..3 chosen 3, 1, 0 and 2 times: mean 1.5, so b_i moves by u * sign(1.5 - c_i) = u * (-1, +1, +1, -1).
    chosen = torch.tensor([[0, 1], [0, 3], [0, 3]])
    bias = torch.tensor([0.5, 0.0, -0.25, 0.0])
    updated = smora_bias_update(bias, chosen, rate=0.1)
    torch.testing.assert_close(updated, torch.tensor([0.4, 0.1, -0.15, -0.1]))
    # Equal counts leave the bias alone.
    assert torch.equal(smora_bias_update(bias, torch.tensor([[0, 1], [2, 3]]), rate=0.1), bias)


def test_gates_take_the_bias_into_the_values_as_the_official_code_does():
    scores = torch.tensor([[0.9, 0.2, 0.6, 0.4]])
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0])
    gates, chosen = smora_gates(scores, bias, k=2)
    # s + b = (0.9, 0.7, 0.6, 0.4): ranks 0 and 1; g = k * v / sum v with v = s + b.
    assert sorted(chosen[0].tolist()) == [0, 1]
    torch.testing.assert_close(gates, torch.tensor([[2 * 0.9 / 1.6, 2 * 0.7 / 1.6, 0.0, 0.0]]))
    # Without the bias in the gate values the same ranks are chosen, weighted by their scores alone.
    gates, chosen = smora_gates(scores, bias, k=2, bias_in_gate=False)
    assert sorted(chosen[0].tolist()) == [0, 1]
    torch.testing.assert_close(gates, torch.tensor([[2 * 0.9 / 1.1, 2 * 0.2 / 1.1, 0.0, 0.0]]))


def test_layer_computes_the_gated_rank_sum():
    model = tiny_net().eval()
    add_adapter(model, SMoRAConfig(rank=8, activate_r=3, alpha=6.0, target_modules=["fc1"]))
    _randomize(model)
    layer: SMoRALinear = model.blocks[0]["fc1"]
    with torch.no_grad():
        layer.rank_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    out = layer(x)
    for i in range(4):
        s = torch.sigmoid(layer.router.weight @ x[i]) + layer.rank_bias
        top = torch.topk(s, 3)
        g = torch.zeros(8)
        g[top.indices] = 3 * top.values / top.values.sum()
        expected = layer.base_layer(x[i]) + (6.0 / 3) * layer.lora_B @ (g * (layer.lora_A @ x[i]))
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-6)


def test_a_training_forward_moves_the_bias_after_choosing_and_an_eval_forward_does_not():
    model = tiny_net()
    add_adapter(model, SMoRAConfig(rank=8, activate_r=2, bias_update_rate=0.01, target_modules=["fc1"]))
    _randomize(model)
    layer = model.blocks[0]["fc1"]
    x = token_input()
    model.eval()
    model(x)
    assert float(layer.rank_bias.abs().sum()) == 0
    model.train()
    scores = torch.sigmoid(layer.router(model.proj_in(x)))  # fc1 of block 0 reads proj_in's output
    _, chosen = smora_gates(scores, layer.rank_bias, 2)
    model(x)
    torch.testing.assert_close(layer.rank_bias, smora_bias_update(torch.zeros(8), chosen, 0.01))
    assert torch.equal(layer.last_chosen, chosen)  # chosen with the bias as it was before the step
    assert not layer.rank_bias.requires_grad
    assert all(p is not layer.rank_bias for p in trainable_parameters(model))


def test_rank_partition_gives_consecutive_ranks_one_score():
    model = tiny_net().eval()
    add_adapter(model, SMoRAConfig(rank=8, activate_r=4, rank_partition=2, target_modules=["fc1"]))
    layer = model.blocks[0]["fc1"]
    assert tuple(layer.router.weight.shape) == (4, 16)
    model(token_input())
    pairs = layer.last_chosen.reshape(-1, 4).sort(-1).values
    # Each score is repeated over a pair of ranks (2i, 2i+1); ties go to both halves of the chosen pairs.
    assert torch.equal(pairs[:, 0::2] // 2, pairs[:, 1::2] // 2)


def test_activations_sum_to_k_and_leave_padding_out():
    model = tiny_net().eval()
    add_adapter(model, SMoRAConfig(rank=8, activate_r=3, target_modules=["fc2"]))
    _randomize(model)
    x = token_input()
    model(x)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    shares = smora_rank_activations(model, attention_mask=mask)
    layer = model.blocks[1]["fc2"]
    kept = layer.last_chosen[mask.bool()]
    torch.testing.assert_close(shares["blocks.1.fc2"], torch.bincount(kept.reshape(-1), minlength=8).float() / 7)
    assert all(float(v.sum()) == pytest.approx(3.0) for v in smora_rank_activations(model).values())


def test_the_bias_is_saved_with_the_adapter(tmp_path):
    model = tiny_net()
    add_adapter(model, SMoRAConfig(rank=8, activate_r=2, bias_update_rate=0.05, target_modules=["fc1"]))
    _randomize(model)
    model.train()
    for _ in range(3):
        model(token_input())
    model.eval()
    expected = model(token_input())
    save_adapter(model, tmp_path / "s")
    fresh = tiny_net().eval()
    load_adapter(fresh, tmp_path / "s")
    assert all(torch.equal(smora_rank_bias(fresh)[k], v) for k, v in smora_rank_bias(model).items())
    assert any(float(v.abs().sum()) > 0 for v in smora_rank_bias(fresh).values())
    assert torch.equal(fresh(token_input()), expected)


def test_top_k_above_the_rank_is_refused_in_one_line_and_the_model_untouched():
    with pytest.raises(AdapterError) as error:
        SMoRAConfig(rank=8, activate_r=9, target_modules=["fc1"])
    assert str(error.value) == "SMoRA activate_r (the top-k) must be at most rank (8), not 9"
    with pytest.raises(AdapterError, match="rank_partition must divide the rank 8"):
        SMoRAConfig(rank=8, activate_r=2, rank_partition=3, target_modules=["fc1"])
    with pytest.raises(AdapterError, match="bias_update_rate must be a finite number"):
        SMoRAConfig(rank=8, activate_r=2, bias_update_rate=float("inf"), target_modules=["fc1"])
    model = tiny_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = SMoRAConfig(rank=8, activate_r=2, target_modules=["fc1"])
    config.activate_r = 12
    with pytest.raises(AdapterError, match="activate_r"):
        add_adapter(model, config)
    assert adapter_names(model) == [] and set(model.state_dict()) == set(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
