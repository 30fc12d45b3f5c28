"""SoRA's equations: the gated forward, the L1 term, the proximal step and its schedule, and pruning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    LoRALinear,
    SoRAConfig,
    SoRALinear,
    SparseAdamW,
    adapter_state_dict,
    add_adapter,
    count_parameters,
    export_pruned,
    gate_optimizer,
    live_ranks,
    load_adapter,
    proximal_step_,
    prune,
    save_adapter,
    sparsifying_schedule,
    sparsity_loss,
)
from pipelines.adapters.core import layers_of
from pipelines.adapters.sora import factor_parameters, gate_parameters
from tests.adapter_cases import tiny_net, token_input


def _layer(rank=5, alpha=10.0) -> SoRALinear:
    torch.manual_seed(0)
    layer = SoRALinear(nn.Linear(9, 6), SoRAConfig(rank=rank, alpha=alpha))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _model(rank=6, seed=2, **fields):
    model = tiny_net()
    torch.manual_seed(seed)
    add_adapter(model, SoRAConfig(rank=rank, alpha=12.0, target_modules=["fc1", "fc2"], **fields), name="so")
    with torch.no_grad():
        for stack in layers_of(model, "so").values():
            stack[0].lora_B.normal_(std=0.3)
    model.eval()
    return model


def test_forward_is_the_gated_low_rank_update_scaled_by_alpha_over_r():
    layer = _layer()
    x = torch.randn(4, 9)
    a, b, g = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_gate.detach()
    expected = layer.base_layer(x) + (10.0 / 5) * ((x @ a.T) * g) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight(), 2.0 * (b * g) @ a)


def test_new_layer_is_identity_with_gaussian_gates():
    torch.manual_seed(0)
    base = nn.Linear(9, 6)
    layer = SoRALinear(base, SoRAConfig(rank=64))
    x = torch.randn(3, 9)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_gate.shape == (64,) and 0.6 < float(layer.lora_gate.detach().std()) < 1.4


def test_official_proximal_step_follows_the_codes_three_in_place_steps():
    # xi = 0.25 and values on a 1/8 grid: exact in binary, so the boundaries are tested exactly.
    values = torch.tensor([1.0, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, -0.125, -0.25, -0.375, -0.5, -1.0])
    official = proximal_step_(values.clone(), 0.25, "official")
    # Above xi loses xi, below -xi gains xi; then whatever is now smaller than xi in magnitude becomes zero.
    assert official.tolist() == [0.75, 0.375, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0, -0.25, 0.0, -0.25, -0.75]
    soft = proximal_step_(values.clone(), 0.25, "soft")
    assert soft.tolist() == [0.75, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0, -0.125, -0.25, -0.75]
    assert torch.equal(proximal_step_(values.clone(), 0.0), values)


def test_sparse_adamw_step_is_adam_with_bias_correction_then_the_threshold():
    p = nn.Parameter(torch.tensor([0.8, -0.3, 0.09, 2.0]))
    grad = torch.tensor([0.5, -0.2, 0.1, -1.0])
    lr, xi, eps, wd = 0.1, 0.02, 1e-6, 0.5
    optimizer = SparseAdamW([p], lr=lr, eps=eps, weight_decay=wd, thresholds=[xi], proximal="soft")
    p.grad = grad.clone()
    optimizer.step()
    # One step: m = 0.1 g, v = 0.001 g^2, step size lr * sqrt(1 - 0.999) / (1 - 0.9), decay on the old weights.
    p0 = torch.tensor([0.8, -0.3, 0.09, 2.0], dtype=torch.float64)
    g = grad.double()
    m, v = 0.1 * g, 0.001 * g * g
    step_size = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
    moved = p0 - step_size * m / (v.sqrt() + eps) - lr * wd * p0
    expected = torch.sign(moved) * torch.clamp(moved.abs() - xi, min=0)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)
    assert float(p.detach()[2]) == 0.0  # about 0.09 - 0.1 - 0.00225: inside the threshold


def test_sparse_adamw_defaults_are_the_official_gate_optimiser():
    optimizer = SparseAdamW([nn.Parameter(torch.zeros(2))])
    group = optimizer.param_groups[0]
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.0 and group["correct_bias"]
    assert group["betas"] == (0.9, 0.999) and group["proximal"] == "official"


def test_sparsifying_schedule_matches_the_official_lists():
    assert sparsifying_schedule(0.0, 7e-4, 7) == pytest.approx(np.linspace(0, 7e-4, 7).tolist())
    assert sparsifying_schedule(1e-4, 1e-2, 3, "exp_linear") == pytest.approx([1e-4, 1e-3, 1e-2])
    log_linear = sparsifying_schedule(0.0, 1.0, 3, "log_linear")
    assert log_linear == pytest.approx([0.0, math.log((1 + math.e) / 2), 1.0])
    with pytest.raises(AdapterError, match="unknown"):
        sparsifying_schedule(0.0, 1.0, 3, "cosine")


def test_threshold_stays_for_the_first_phase_then_rises_a_stage_at_a_time():
    p = nn.Parameter(torch.zeros(3))
    optimizer = SparseAdamW([p], thresholds=[0.1, 0.2, 0.3], schedule_start=2, stage_steps=3)
    seen = []
    for _ in range(12):
        p.grad = torch.zeros(3)
        optimizer.step()
        seen.append(SparseAdamW.threshold_of(optimizer.param_groups[0]))
    assert seen == [0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]


def test_step_threshold_advances_by_hand_and_stops_at_the_last_value():
    optimizer = SparseAdamW([nn.Parameter(torch.zeros(1))], thresholds=[0.0, 0.5, 1.0])
    group = optimizer.param_groups[0]
    for expected in (0.5, 1.0, 1.0):
        optimizer.step_threshold()
        assert SparseAdamW.threshold_of(group) == expected


def test_schedule_position_survives_a_checkpoint_of_the_optimizer():
    from pipelines.training import _optimizer_from_tensors, _optimizer_to_tensors

    def run(optimizer, p, steps):
        for i in range(steps):
            p.grad = torch.full_like(p, 0.1 * (i + 1))
            optimizer.step()

    p = nn.Parameter(torch.linspace(-1, 1, 6))
    optimizer = SparseAdamW([p], thresholds=[0.01, 0.05], schedule_start=3, stage_steps=2)
    run(optimizer, p, 4)
    tensors, meta = _optimizer_to_tensors(optimizer)
    copy = nn.Parameter(p.detach().clone())
    restored = SparseAdamW([copy], thresholds=[0.01, 0.05], schedule_start=3, stage_steps=2)
    _optimizer_from_tensors(restored, {k: v.clone() for k, v in tensors.items()}, meta)  # as if read from disk
    run(optimizer, p, 3)
    run(restored, copy, 3)
    assert torch.equal(p, copy)


def test_sparsity_loss_is_eta_times_the_mean_absolute_gate():
    model = _model(l1_weight=2.5)
    gates = gate_parameters(model, "so")
    expected = 2.5 * torch.cat([g.detach() for g in gates]).abs().mean()
    torch.testing.assert_close(sparsity_loss(model, "so").detach(), expected)
    assert len(gates) == 4 and not {id(g) for g in gates} & {id(p) for p in factor_parameters(model, "so")}


def test_gate_optimizer_takes_the_configs_threshold_schedule():
    model = _model(threshold=1e-3, schedule="linear", max_threshold=4e-3, schedule_stages=4)
    optimizer = gate_optimizer(model, "so", lr=0.01)
    group = optimizer.param_groups[0]
    assert group["thresholds"] == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])
    assert len(group["params"]) == 4


def _zero_some_gates(model):
    with torch.no_grad():
        layers = [stack[0] for stack in layers_of(model, "so").values()]
        layers[0].lora_gate[[0, 2, 5]] = 0.0
        layers[1].lora_gate[:] = 0.0
        layers[2].lora_gate[1] = 0.0
    return layers


def test_pruning_drops_zero_gates_into_a_smaller_lora_with_the_same_outputs():
    model = _model()
    _zero_some_gates(model)
    x = token_input()
    expected = model(x)
    assert live_ranks(model, "so") == {"blocks.0.fc1": 3, "blocks.0.fc2": 0, "blocks.1.fc1": 5,
                                       "blocks.1.fc2": 6}
    before = count_parameters(model, "so")
    lora = prune(model, "so")
    assert lora.rank == 6 and lora.rank_pattern == {"blocks.0.fc1": 3, "blocks.1.fc1": 5}
    layers = layers_of(model, "so")
    assert sorted(layers) == ["blocks.0.fc1", "blocks.1.fc1", "blocks.1.fc2"]  # the dead layer is gone
    assert all(type(stack[0]) is LoRALinear for stack in layers.values())
    assert layers["blocks.0.fc1"][0].lora_A.shape[0] == 3
    assert count_parameters(model, "so") < before
    assert (model(x) - expected).abs().max() < 1e-6


def test_pruned_adapter_saves_and_loads_with_its_per_layer_ranks(tmp_path):
    model = _model()
    _zero_some_gates(model)
    prune(model, "so")
    x = token_input()
    expected = model(x)
    save_adapter(model, tmp_path / "pruned", "so")
    fresh = tiny_net()
    fresh.eval()
    load_adapter(fresh, tmp_path / "pruned")
    assert torch.equal(fresh(x), expected)
    assert adapter_state_dict(fresh, "so")["blocks.0.fc1.lora_A"].shape[0] == 3


def test_export_pruned_folds_the_gate_into_b():
    model = _model()
    layers = _zero_some_gates(model)
    _, state = export_pruned(model, "so")
    live = torch.tensor([1, 3, 4])
    torch.testing.assert_close(state["blocks.0.fc1.lora_A"], layers[0].lora_A.detach()[live])
    torch.testing.assert_close(state["blocks.0.fc1.lora_B"],
                               layers[0].lora_B.detach()[:, live] * layers[0].lora_gate.detach()[live])


def test_layer_export_at_a_smaller_rank_keeps_the_largest_gates():
    layer = _layer(rank=5)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.5, -2.0, 0.0, 0.1, 1.0]))
    down, up = layer.export_lora(rank=2)
    keep = torch.tensor([1, 4])
    torch.testing.assert_close(down, layer.lora_A.detach()[keep])
    torch.testing.assert_close(up, 2.0 * layer.lora_B.detach()[:, keep] * layer.lora_gate.detach()[keep])
    full_down, full_up = layer.export_lora()
    assert full_down.shape[0] == 4
    torch.testing.assert_close(full_up @ full_down, layer.get_delta_weight(), rtol=1e-5, atol=1e-6)


def test_pruning_with_every_gate_zero_is_refused_and_the_model_untouched():
    model = _model()
    with torch.no_grad():
        for gate in gate_parameters(model, "so"):
            gate.zero_()
    with pytest.raises(AdapterError, match="every gate"):
        prune(model, "so")
    assert all(type(stack[0]) is SoRALinear for stack in layers_of(model, "so").values())


def test_gates_fall_to_zero_under_the_l1_term_and_threshold():
    model = _model(rank=8, l1_weight=1.0, threshold=0.01)
    x = token_input()
    target = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    main = torch.optim.AdamW(factor_parameters(model, "so"), lr=1e-2)
    gates = gate_optimizer(model, "so", lr=1e-2)
    before = sum(live_ranks(model, "so").values())
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean() + sparsity_loss(model, "so")
        loss.backward()
        main.step()
        gates.step()
        main.zero_grad()
        gates.zero_grad()
    after = sum(live_ranks(model, "so").values())
    assert before == 32 and after < before


@pytest.mark.parametrize("fields, message", [
    ({"rank": 0}, "rank"),
    ({"alpha": 0.0}, "alpha"),
    ({"threshold": -1e-3}, "threshold"),
    ({"l1_weight": float("nan")}, "l1_weight"),
    ({"proximal": "hard"}, "proximal"),
    ({"schedule": "cosine"}, "schedule"),
    ({"schedule": "exp_linear", "threshold": 0.0}, "exp_linear"),
    ({"schedule_stages": 0}, "schedule_stages"),
])
def test_bad_config_is_refused_with_one_line(fields, message):
    with pytest.raises(AdapterError, match=message):
        SoRAConfig(**fields, target_modules=["fc1"])
