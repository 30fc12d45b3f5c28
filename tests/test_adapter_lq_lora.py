"""LQ-LoRA: the quantiser, the iterative decomposition, the Fisher weighting, the budget's integer program and
the layer, against explicit formulas on random tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    LoRAConfig,
    LQLoRAConfig,
    QuantFormat,
    add_adapter,
    fisher_information,
    load_adapter,
    lq_decompose,
    lq_lora_report,
    plan_lq_lora,
    save_adapter,
    trainable_parameters,
)
from pipelines.adapters.lq_lora import quant as lq_quant
from pipelines.adapters.lq_lora.plan import allocation_table, solve_assignment
from tests.adapter_cases import tiny_net, token_input
from tests.test_adapters_core import _assert_unchanged, _snapshot


def _weight(rows=24, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.1


# -- the quantiser ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_normal_float_grid_is_the_official_quantile_construction(bits):
    from scipy.stats import norm

    offset = 0.9677083
    left = [(1 - offset) + k * (0.5 - (1 - offset)) / (2 ** (bits - 1) - 1) for k in range(2 ** (bits - 1) - 1)]
    right = [0.5 + k * (offset - 0.5) / 2 ** (bits - 1) for k in range(2 ** (bits - 1) + 1)]
    expected = torch.tensor(norm.ppf(left + right) / norm.ppf(offset), dtype=torch.float32)
    grid = QuantFormat("nf", bits).values()
    assert grid.numel() == 2**bits and grid[0] == -1 and grid[-1] == 1 and (grid == 0).sum() == 1
    torch.testing.assert_close(grid, expected, rtol=0, atol=2e-6)


def test_integer_grid_is_symmetric_and_narrow():
    grid = QuantFormat("int", 3).values()
    torch.testing.assert_close(grid, torch.tensor([-3, -2, -1, 0, 1, 2, 3]) / 3.0)


@pytest.mark.parametrize("name", ["nf3-16-4-bf16-4", "int4-8-0-fp16-1", "nf2-64-8-fp32-256"])
def test_each_number_becomes_the_nearest_grid_value_times_its_double_quantised_block_scale(name):
    fmt = QuantFormat.parse(name)
    weight = _weight()
    stored = lq_quant.quantize(weight, fmt)
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, stored["codes"].numel() - weight.numel()))
    blocks = flat.view(-1, fmt.block_size)
    absmax = blocks.abs().amax(1)
    if fmt.scale_bits:
        offset = absmax.min()
        groups = torch.nn.functional.pad(absmax - offset, (0, (-absmax.numel()) % fmt.scale_block_size))
        groups = groups.view(-1, fmt.scale_block_size)
        top = 2**fmt.scale_bits - 1
        amax = groups.amax(1, keepdim=True).to(lq_quant.SCALE_DTYPES[fmt.scale_dtype]).float()
        codes = torch.round(groups * top / amax).clamp(0, top)
        scales = (codes / (top / amax)).reshape(-1)[: absmax.numel()] + offset
        assert torch.equal(stored["scales"].float(), codes.reshape(-1)[: absmax.numel()])
    else:
        scales = absmax.to(lq_quant.SCALE_DTYPES[fmt.scale_dtype]).float()
    grid = fmt.values()
    nearest = (blocks[:, :, None] / scales[:, None, None] - grid).abs().argmin(-1)
    assert torch.equal(stored["codes"].long().view(-1, fmt.block_size), nearest)
    expected = (grid[nearest] * scales[:, None]).reshape(-1)[: weight.numel()].reshape(weight.shape)
    torch.testing.assert_close(lq_quant.dequantize(stored, fmt, tuple(weight.shape)), expected)


def test_storage_counts_codes_scale_codes_group_scales_and_the_offset():
    fmt = QuantFormat.parse("nf3-16-4-bf16-4")
    numel = 24 * 40  # 60 blocks of 16, 15 groups of 4
    assert fmt.storage_bits(numel) == numel * 3 + 60 * 4 + 15 * 16 + 32
    plain = QuantFormat.parse("nf4-64-0-fp32-256")
    assert plain.storage_bits(numel) == numel * 4 + 15 * 32
    assert fmt.official_storage_bits(numel) == pytest.approx(numel * (3 + 4 / 16 + 16 / 64))


def test_a_malformed_format_name_is_refused_in_one_line():
    with pytest.raises(AdapterError, match="must look like 'nf4-64-8-fp32-256'"):
        LQLoRAConfig(quant_format="nf9-64-8-fp32-256")


# -- the decomposition --------------------------------------------------------------------------------------------


def test_decomposition_error_falls_over_iterations_and_beats_plain_quantisation():
    weight, fmt = _weight(48, 64), QuantFormat.parse("nf2-16-8-fp32-16")
    torch.manual_seed(0)
    result = lq_decompose(weight, 6, fmt, num_iterations=50)
    errors = result.errors
    assert len(errors) >= 3
    assert all(b < a for a, b in zip(errors[: result.best_iteration + 1], errors[1: result.best_iteration + 1],
                                     strict=False))
    assert result.error == min(errors)
    approx = result.Q + result.L1 @ result.L2
    assert float(torch.linalg.norm(weight - approx)) == pytest.approx(result.error, rel=1e-5)
    plain = lq_decompose(weight, 0, fmt)
    assert result.error < 0.9 * plain.error
    # Q is the quantisation of W - L1 L2: re-quantising gives Q back.
    again, _ = lq_quant.quantize_dequantize(weight - result.L1 @ result.L2, fmt)
    assert torch.equal(again, result.Q)


def test_the_official_stopping_rule_returns_the_iteration_whose_error_rose():
    weight, fmt = _weight(48, 64), QuantFormat.parse("nf2-16-8-fp32-16")
    torch.manual_seed(0)
    official = lq_decompose(weight, 6, fmt, num_iterations=50, return_best=False)
    if official.errors[-1] > official.errors[-2]:
        assert official.error == official.errors[-1] > min(official.errors)
    approx = official.Q + official.L1 @ official.L2
    assert float(torch.linalg.norm(weight - approx)) == pytest.approx(official.errors[-1], rel=1e-5)


def test_fisher_weighting_scales_rows_and_columns_and_weights_the_error():
    weight, fmt = _weight(), QuantFormat.parse("nf3-8-8-fp32-8")
    fisher = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) + 0.1
    result = lq_decompose(weight, 4, fmt, fisher=fisher, num_iterations=1, randomized=False)
    rows = fisher.mean(1, keepdim=True).sqrt()
    cols = fisher.mean(0, keepdim=True).sqrt()
    U, S, Vt = torch.linalg.svd(rows * weight * cols, full_matrices=False)
    L1 = U[:, :4] * S[:4].sqrt() / rows
    L2 = S[:4].sqrt()[:, None] * Vt[:4] / cols
    torch.testing.assert_close(result.L1 @ result.L2, L1 @ L2, rtol=1e-4, atol=1e-6)
    weighted = float(torch.linalg.norm(fisher.sqrt() * (weight - result.Q - result.L1 @ result.L2)))
    assert result.error == pytest.approx(weighted, rel=1e-5)
    uniform = lq_decompose(weight, 4, fmt, fisher=torch.ones_like(weight), num_iterations=3, randomized=False)
    plain = lq_decompose(weight, 4, fmt, num_iterations=3, randomized=False)
    torch.testing.assert_close(uniform.Q, plain.Q)


def test_empirical_fisher_is_the_sum_of_squared_per_example_gradients_and_leaves_the_model_as_it_was():
    model = tiny_net()
    model.eval()
    x = token_input()
    batches = [x[i: i + 1] for i in range(2)]

    def loss(m, batch):
        return m(batch).pow(2).mean()

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = fisher_information(model, loss, batches, ["blocks.0.fc1"])
    expected = torch.zeros_like(model.blocks[0]["fc1"].weight)
    for batch in batches:
        model.zero_grad()
        loss(model, batch).backward()
        expected += model.blocks[0]["fc1"].weight.grad ** 2
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fisher["blocks.0.fc1"], expected)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    by_config = fisher_information(model, loss, batches, LQLoRAConfig(target_modules=["fc1"]))
    assert sorted(by_config) == ["blocks.0.fc1", "blocks.1.fc1"]
    torch.testing.assert_close(by_config["blocks.0.fc1"], expected)


# -- the budget ------------------------------------------------------------------------------------------------


def test_the_integer_program_finds_the_least_error_assignment_within_the_budget():
    generator = torch.Generator().manual_seed(3)
    errors = torch.rand(4, 3, generator=generator).double().numpy()
    bits = torch.tensor([[2.0, 3.0, 4.0]] * 4).double().numpy() * 100
    capacity = 1150.0
    chosen = solve_assignment(errors, bits, capacity)
    best = min((c for c in itertools.product(range(3), repeat=4) if sum(bits[i, j] for i, j in enumerate(c)) <=
                capacity), key=lambda c: sum(errors[i, j] for i, j in enumerate(c)))
    assert tuple(chosen) == best


@pytest.mark.parametrize("budget", [2.8, 3.4, 4.7])
def test_a_planned_adapter_holds_its_budget_and_a_tighter_budget_costs_error(budget):
    model = tiny_net()
    config = LQLoRAConfig(rank=2, num_iterations=4, target_modules=["fc1", "fc2"])
    formats = ["nf2-16-8-fp32-16", "nf3-16-8-fp32-16", "nf4-16-8-fp32-16"]
    torch.manual_seed(0)
    planned, table = plan_lq_lora(model, config, budget, formats)
    assert set(planned.formats) == set(table.modules) and planned.formats == table.solve(budget)
    assert table.average_bits(planned.formats) <= budget
    torch.manual_seed(0)
    add_adapter(model, planned)
    report = lq_lora_report(model)
    spent = sum(r["bits_per_parameter"] * r["numel"] for r in report.values()) / sum(r["numel"] for r in report.values())
    assert spent == pytest.approx(table.average_bits(planned.formats)) and spent <= budget
    if budget < 4.7:
        assert table.total_error(planned.formats) > table.total_error(table.solve(4.7))


def test_a_budget_below_the_smallest_format_is_refused_and_the_model_untouched():
    model = tiny_net()
    snapshot = _snapshot(model)
    config = LQLoRAConfig(rank=2, num_iterations=2, target_modules=["fc1"])
    with pytest.raises(AdapterError, match=r"budget 1.5 bits a parameter is below the 2\.\d+"):
        plan_lq_lora(model, config, 1.5, ["nf2-16-8-fp32-16", "nf4-16-8-fp32-16"])
    _assert_unchanged(model, snapshot)
    table = allocation_table(model, config, ["nf2-16-8-fp32-16"])
    for bad in (math.nan, math.inf, True):
        with pytest.raises(AdapterError, match="budget must be a finite number"):
            table.solve(bad)


# -- the layer ---------------------------------------------------------------------------------------------------


def _layer_model(**options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24))
    torch.manual_seed(1)
    add_adapter(model, LQLoRAConfig(target_modules=["0"], **options))
    return model


def test_forward_is_q_x_plus_scaled_b_a_x_plus_bias_and_starts_at_the_decomposition():
    model = _layer_model(rank=4, alpha=8.0, quant_format="nf3-8-8-fp32-8", num_iterations=10)
    layer = model[0]
    x = torch.randn(3, 40)
    Q = layer.quantized_weight()
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ Q.T + 2.0 * x @ (B @ A).T + layer.original_module().bias
    torch.testing.assert_close(model(x), expected)
    torch.manual_seed(1)
    result = lq_decompose(layer.original_module().weight, 4, layer.format, num_iterations=10)
    torch.testing.assert_close(Q, result.Q)
    torch.testing.assert_close(2.0 * B @ A, result.L1 @ result.L2, rtol=1e-5, atol=1e-6)
    assert [p.shape for p in trainable_parameters(model)] == [A.shape, B.shape]


def test_the_qlora_baseline_starts_as_plain_quantisation():
    model = _layer_model(rank=4, init="qlora", quant_format="nf3-8-8-fp32-8")
    layer = model[0]
    x = torch.randn(3, 40)
    assert torch.count_nonzero(layer.lora_B) == 0
    Q, _ = lq_quant.quantize_dequantize(layer.original_module().weight, layer.format)
    torch.testing.assert_close(model(x), x @ Q.T + layer.original_module().bias)


def test_loading_restores_q_without_decomposing_again(tmp_path, monkeypatch):
    model = _layer_model(rank=4, quant_format="nf3-8-8-fp32-8", num_iterations=5)
    x = torch.randn(3, 40)
    expected = model(x)
    save_adapter(model, tmp_path / "lq")
    from pipelines.adapters.lq_lora import layer as lq_layer

    def refuse(*args, **kwargs):
        raise AssertionError("load_adapter decomposed the weight again")

    monkeypatch.setattr(lq_layer, "lq_decompose", refuse)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(40, 24))
    load_adapter(fresh, tmp_path / "lq")
    assert torch.equal(fresh(x), expected)


def test_lq_lora_must_be_the_first_adapter_on_its_module_and_the_model_is_left_untouched():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="lora")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="must be the first adapter"):
        add_adapter(model, LQLoRAConfig(rank=2, target_modules=["fc1"]), name="lq")
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 17}, "rank 17 exceeds the smaller side"),
    ({"rank": 2, "formats": {"blocks.0.fc9": "nf4-64-8-fp32-256"}}, "formats name blocks.0.fc9"),
    ({"rank": 2, "fisher": {"blocks.0.fc1": torch.ones(3, 3)}}, "fisher of blocks.0.fc1 has shape"),
])
def test_a_config_that_does_not_fit_the_model_is_refused_and_the_model_untouched(options, message):
    model = tiny_net()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match=message):
        add_adapter(model, LQLoRAConfig(target_modules=["fc1"], **options))
    _assert_unchanged(model, snapshot)


def test_forged_codes_beyond_the_grid_fail_with_one_line():
    model = _layer_model(rank=2, quant_format="nf2-8-8-fp32-8", num_iterations=2)
    with torch.no_grad():
        model[0].quant_codes[0] = 200
    with pytest.raises(AdapterError, match="codes reach 200, beyond the 4 values of nf2"):
        model(torch.randn(1, 40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantises on a GPU")
def test_bitsandbytes_quantises_nf4_like_the_torch_code():
    pytest.importorskip("bitsandbytes")
    weight, fmt = _weight(64, 128).cuda(), QuantFormat.parse("nf4-64-0-fp32-256")
    assert lq_quant.bitsandbytes_handles(fmt)
    ours = lq_quant.quantize(weight, fmt)
    theirs = lq_quant._bitsandbytes_quantize(weight, fmt)
    torch.testing.assert_close(theirs["scales"], ours["scales"])
    assert (theirs["codes"] != ours["codes"]).float().mean() < 0.01  # ties and table rounding only
