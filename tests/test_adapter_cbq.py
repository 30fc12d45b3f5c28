"""CBQ: the quantised layer (grid, round-to-nearest start, LoRA-Rounding, straight-through gradient), the
coarse-to-fine outlier cut, the window schedule and loss, and cross-block calibration on a small model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters import (
    AdapterError,
    CBQConfig,
    LoRAConfig,
    add_adapter,
    block_output_errors,
    cbq_calibrate,
    load_adapter,
    merge,
    save_adapter,
)
from pipelines.adapters.cbq import outlier_threshold, rectified_sigmoid, window_loss, window_starts
from pipelines.adapters.cbq.layer import CBQLinear, adaround_init
from tests.test_adapters_core import _assert_unchanged, _snapshot


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Stack(nn.Module):
    """Three residual blocks, each taking the previous one's output: the shape cbq_calibrate expects."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Residual(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _stack(seed=0) -> Stack:
    torch.manual_seed(seed)
    return Stack().eval()


def _data(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 16, generator=generator) for _ in range(n)]


def _layer(bits=3, group_size=0, **options) -> CBQLinear:
    torch.manual_seed(0)
    return CBQLinear(nn.Linear(12, 10), CBQConfig(bits=bits, group_size=group_size, **options))


# -- the quantised layer -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "group_size"), [(2, 0), (3, 4), (4, 6)])
def test_a_new_adapter_rounds_to_nearest_on_a_min_max_grid(bits, group_size):
    layer = _layer(bits, group_size)
    weight = layer.original_module().weight.detach()
    grouped = weight.view(10, -1, group_size or 12)
    top = 2**bits - 1
    step = ((grouped.amax(-1) - grouped.amin(-1)) / top).repeat_interleave(group_size or 12, 1)
    zero = torch.round(-grouped.amin(-1) / ((grouped.amax(-1) - grouped.amin(-1)) / top)).repeat_interleave(
        group_size or 12, 1)
    ratio = weight / step
    nearest = torch.floor(ratio) + (ratio - torch.floor(ratio) >= 0.5).float()
    expected = (torch.clamp(nearest + zero, 0, top) - zero) * step
    torch.testing.assert_close(layer.quantized_weight(), expected)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), F.linear(x, expected, layer.original_module().bias))


def test_lora_rounding_yields_values_on_the_quantisation_grid():
    layer = _layer(bits=3, rank=2)
    with torch.no_grad():
        layer.round_A.normal_()
        layer.step.mul_(torch.rand_like(layer.step) + 0.5)
    step = layer.step.abs().repeat_interleave(12, 1)
    levels = layer.quantized_weight() / step + layer.zero_point.repeat_interleave(12, 1)
    torch.testing.assert_close(levels, torch.round(levels), rtol=0, atol=1e-4)
    assert levels.min() >= -1e-4 and levels.max() <= 7 + 1e-4
    nearest = _layer(bits=3, rounding="nearest")
    changed = (layer.integer_weight() != nearest.integer_weight()).float().mean()
    assert 0 < changed < 1  # the learned offsets moved some weights to the other neighbour


def test_lora_rounding_is_a_low_rank_offset_on_adarounds_initial_logits():
    layer = _layer(bits=3, rank=2)
    with torch.no_grad():
        layer.round_A.normal_()
    ratio = layer.scaled_weight() / layer.step.abs().repeat_interleave(12, 1)
    rest = ratio - torch.floor(ratio)
    v0 = adaround_init(rest, 1.1, -0.1)
    torch.testing.assert_close(rectified_sigmoid(v0, 1.1, -0.1), rest, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.rounding_logits(rest), v0 + layer.round_A @ layer.round_B)
    assert layer.rounding_parameter_count() == 2 * (10 + 12)
    assert _layer(rounding="full").rounding_parameter_count() == 10 * 12
    assert _layer(rounding="nearest").rounding_parameter_count() == 0


def test_straight_through_rounding_keeps_the_hard_value_and_passes_h_gradient():
    layer = _layer(bits=3, rank=2)
    with torch.no_grad():
        layer.round_A.normal_(std=0.5)
    hard_weight = layer.quantized_weight().detach()
    layer.relaxation = "ste"
    weights = torch.randn(10, 12, generator=torch.Generator().manual_seed(4))
    straight = layer.quantized_weight()
    torch.testing.assert_close(straight, hard_weight)
    (weights * straight).sum().backward()
    # The same forward written out: V = V0(rest) + A1 A2, hard 1[V >= 0] carrying h(V)'s gradient.
    step = layer.step.detach().abs().repeat_interleave(12, 1)
    zero = layer.zero_point.repeat_interleave(12, 1)
    ratio = layer.scaled_weight().detach() / step
    rest = ratio - torch.floor(ratio)
    v = (-torch.log(1.2 / (rest + 0.1) - 1) + layer.round_A.detach() @ layer.round_B.detach()).requires_grad_(True)
    soft = (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)
    levels = torch.floor(ratio) + (v >= 0).float() + soft - soft.detach() + zero
    (weights * (levels.clamp(0, 7) - zero) * step).sum().backward()
    assert v.grad.abs().sum() > 0
    torch.testing.assert_close(layer.round_A.grad, v.grad @ layer.round_B.detach().T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.round_B.grad, layer.round_A.detach().T @ v.grad, rtol=1e-5, atol=1e-7)


def test_an_adapter_that_quantises_activations_refuses_to_merge():
    model = _stack()
    add_adapter(model, CBQConfig(bits=4, act_bits=8, target_modules=["fc1"]))
    with pytest.raises(AdapterError, match="quantises activations to 8 bits cannot be merged"):
        merge(model)


@pytest.mark.parametrize(("options", "message"), [
    ({"group_size": 5}, "group_size 5 does not divide the 16 input features"),
    ({"rank": 40}, "rank 40 exceeds the smaller side"),
    ({"overlap": 2}, "overlap must be smaller than window_size 2"),
    ({"bits": 1}, "bits must be a whole number of at least 2"),
])
def test_a_config_that_does_not_fit_is_refused_and_the_model_untouched(options, message):
    model = _stack()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match=message):
        add_adapter(model, CBQConfig(target_modules=["fc1"], **options))
    _assert_unchanged(model, snapshot)


def test_cbq_must_be_the_first_adapter_on_its_module():
    model = _stack()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="lora")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="must be the first adapter"):
        add_adapter(model, CBQConfig(target_modules=["fc1"]), name="q")
    _assert_unchanged(model, snapshot)


# -- windows, loss and outliers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "window", "overlap", "starts"), [
    (2, 2, 1, [0]), (4, 2, 1, [0, 1, 2]), (5, 3, 1, [0, 2]), (5, 2, 0, [0, 2, 3]), (3, 1, 0, [0, 1, 2])])
def test_windows_slide_by_size_minus_overlap_and_end_at_the_last_block(blocks, window, overlap, starts):
    assert window_starts(blocks, window, overlap) == starts


def test_window_loss_is_squared_error_summed_over_features_plus_the_per_token_kl():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 5, 6, generator=generator), torch.randn(2, 5, 6, generator=generator)
    p, q = target.softmax(-1), prediction.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    expected = (prediction - target).pow(2).sum(-1).mean() + 0.5 * kl
    torch.testing.assert_close(window_loss(prediction, target, 0.5), expected)


def test_coarse_to_fine_cuts_planted_outliers_at_the_largest_kept_value():
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(500, generator=generator)
    planted = torch.tensor([9.0, 8.5, 8.0])
    threshold, count = outlier_threshold(torch.cat([values, planted]))
    assert count == 3 and threshold == pytest.approx(float(values.max()))
    assert outlier_threshold(values) == (float("inf"), 0)  # uniform values: nothing above Q3 + 1.5 IQR


def test_cfp_scales_an_outlier_input_channel_when_activations_are_quantised():
    model = _stack()
    add_adapter(model, CBQConfig(bits=4, act_bits=8, steps=0, target_modules=["fc1"]), name="q")
    data = [x.clone() for x in _data()]
    for x in data:
        x[:, 5] *= 40.0
    cbq_calibrate(model, "q", list(model.blocks)[:1], data)
    scale = model.blocks[0].fc1.act_scale
    assert scale[5] > 1 and torch.all(scale[torch.arange(16) != 5] == 1)


# -- calibration ----------------------------------------------------------------------------------------------


def test_cross_block_calibration_lowers_the_last_blocks_error_below_round_to_nearest():
    data = _data()
    rtn = _stack()
    add_adapter(rtn, CBQConfig(bits=2, rounding="nearest", target_modules=["fc1", "fc2"]), name="q")
    before = block_output_errors(rtn, list(rtn.blocks), data)
    model = _stack()
    torch.manual_seed(0)
    add_adapter(model, CBQConfig(bits=2, rank=2, steps=60, target_modules=["fc1", "fc2"]), name="q")
    report = cbq_calibrate(model, "q", list(model.blocks), data)
    assert report.windows == [(0, 1), (1, 2)]
    assert all(losses[-1] < losses[0] for losses in report.losses)
    after = block_output_errors(model, list(model.blocks), data)
    assert after[-1] < before[-1]
    assert all(layer.relaxation is None for layer in model.modules() if isinstance(layer, CBQLinear))


def test_a_calibrated_adapter_saves_and_loads_to_the_same_outputs(tmp_path):
    model = _stack()
    torch.manual_seed(0)
    add_adapter(model, CBQConfig(bits=3, steps=10, act_bits=8, target_modules=["fc1", "fc2"]), name="q")
    cbq_calibrate(model, "q", list(model.blocks), _data())
    x = _data(1, seed=9)[0]
    expected = model(x)
    save_adapter(model, tmp_path / "q", "q")
    fresh = _stack()
    load_adapter(fresh, tmp_path / "q")
    assert torch.equal(fresh(x), expected)


def test_calibration_refuses_blocks_of_another_model_and_leaves_the_model_untouched():
    model = _stack()
    add_adapter(model, CBQConfig(bits=3, steps=5, target_modules=["fc1"]), name="q")
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc2"]), name="lora")
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="blocks must be modules of the model"):
        cbq_calibrate(model, "q", list(_stack().blocks), _data())
    with pytest.raises(AdapterError, match="'lora' is not a CBQ adapter"):
        cbq_calibrate(model, "lora", list(model.blocks), _data())
    with pytest.raises(AdapterError, match="needs at least one block and one calibration batch"):
        cbq_calibrate(model, "q", list(model.blocks), [])
    _assert_unchanged(model, snapshot)


def test_calibration_batches_may_be_mappings_of_keyword_arguments_as_a_tokenizer_returns():
    from collections import UserDict

    results = []
    for batches in (_data(), [UserDict(x=x) for x in _data()]):
        model = _stack()
        torch.manual_seed(0)
        add_adapter(model, CBQConfig(bits=2, steps=5, target_modules=["fc1"]), name="q")
        results.append(cbq_calibrate(model, "q", list(model.blocks), batches).losses)
    assert results[0] == results[1]
