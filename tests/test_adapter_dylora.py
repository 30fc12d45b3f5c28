"""DyLoRA's equations: truncation to b ranks at scale alpha / b, frozen-mode gradients, p_B, cutting out a LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    DyLoRAConfig,
    DyLoRALinear,
    LoRALinear,
    adapter_names,
    add_adapter,
    export_rank,
    merge,
    sample_rank,
    set_active,
    set_rank,
    truncate,
    unmerge,
)
from pipelines.adapters.core import layers_of
from tests.adapter_cases import tiny_net, token_input


def _layer(rank=6, min_rank=1, alpha=12.0, mode="frozen") -> DyLoRALinear:
    torch.manual_seed(0)
    layer = DyLoRALinear(nn.Linear(10, 7), DyLoRAConfig(rank=rank, min_rank=min_rank, alpha=alpha, mode=mode))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _model(rank=6, min_rank=2, alpha=12.0, mode="frozen", seed=4):
    model = tiny_net()
    torch.manual_seed(seed)
    add_adapter(model, DyLoRAConfig(rank=rank, min_rank=min_rank, alpha=alpha, mode=mode,
                                    target_modules=["fc1", "fc2"]), name="dy")
    with torch.no_grad():
        for stack in layers_of(model, "dy").values():
            stack[0].lora_B.normal_(std=0.3)
    model.eval()
    return model


def test_forward_at_rank_b_uses_the_first_b_ranks_scaled_by_alpha_over_b():
    layer = _layer()
    layer.eval()
    x = torch.randn(3, 4, 10)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    for rank in range(1, 7):
        layer.eval_rank = rank
        expected = layer.base_layer(x) + (12.0 / rank) * x @ a[:rank].T @ b[:, :rank].T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.eval_rank == 6


def test_new_layer_starts_at_identity_with_kaiming_down_projection():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = DyLoRALinear(base, DyLoRAConfig(rank=4))
    x = torch.randn(2, 10)
    assert torch.equal(layer(x), base(x))
    bound = 1 / 10 ** 0.5  # kaiming_uniform with a = sqrt(5) on fan_in 10
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_frozen_mode_trains_only_the_b_th_row_and_column(rank):
    layer = _layer(mode="frozen")
    layer.train()
    layer.train_rank = rank
    layer(torch.randn(5, 10)).pow(2).sum().backward()
    grad_a, grad_b = layer.lora_A.grad, layer.lora_B.grad
    rows_with_grad = [i for i in range(6) if grad_a[i].abs().sum() > 0]
    cols_with_grad = [i for i in range(6) if grad_b[:, i].abs().sum() > 0]
    assert rows_with_grad == [rank - 1]
    assert cols_with_grad == [rank - 1]


def test_updating_mode_trains_every_row_and_column_up_to_b():
    layer = _layer(mode="updating")
    layer.train()
    layer.train_rank = 4
    layer(torch.randn(5, 10)).pow(2).sum().backward()
    assert [i for i in range(6) if layer.lora_A.grad[i].abs().sum() > 0] == [0, 1, 2, 3]
    assert [i for i in range(6) if layer.lora_B.grad[:, i].abs().sum() > 0] == [0, 1, 2, 3]


def test_frozen_mode_changes_gradients_but_not_the_forward_value():
    frozen, updating = _layer(mode="frozen"), _layer(mode="updating")
    x = torch.randn(5, 10)
    for layer in (frozen, updating):
        layer.train()
        layer.train_rank = 3
    assert torch.equal(frozen(x), updating(x))


def test_training_before_any_sample_is_a_plain_step_at_r_max():
    layer = _layer(mode="frozen")
    layer.train()
    assert layer.rank == 6
    layer(torch.randn(5, 10)).pow(2).sum().backward()
    assert all(layer.lora_A.grad[i].abs().sum() > 0 for i in range(6))


def test_sampled_rank_is_uniform_over_the_range_and_shared_by_every_layer():
    model = _model(rank=6, min_rank=2)
    generator = torch.Generator().manual_seed(0)
    draws = [sample_rank(model, "dy", generator) for _ in range(3000)]
    assert set(draws) == {2, 3, 4, 5, 6}
    counts = torch.bincount(torch.tensor(draws), minlength=7)[2:].double()
    # 600 expected per rank; 5 standard deviations of a binomial is about 110.
    assert (counts - 600).abs().max() < 110
    assert {stack[0].train_rank for stack in layers_of(model, "dy").values()} == {draws[-1]}
    again = torch.Generator().manual_seed(0)
    assert [sample_rank(model, "dy", again) for _ in range(50)] == draws[:50]


def test_rank_weights_set_p_b():
    model = tiny_net()
    add_adapter(model, DyLoRAConfig(rank=4, rank_weights=[0.0, 0.0, 1.0, 3.0], target_modules=["fc1"]), "dy")
    generator = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample_rank(model, "dy", generator) for _ in range(2000)])
    assert set(draws.tolist()) == {3, 4}
    share = float((draws == 4).double().mean())
    assert abs(share - 0.75) < 0.05


def test_evaluation_rank_applies_outside_training_and_sampled_rank_inside():
    model = _model()
    x = token_input()
    set_rank(model, 3, "dy")
    at_three = model(x)
    sample_rank(model, "dy", torch.Generator().manual_seed(5))
    assert torch.equal(model(x), at_three)  # eval mode ignores the training rank
    set_rank(model, 6, "dy")
    assert not torch.allclose(model(x), at_three)


@pytest.mark.parametrize("rank", [2, 4, 6])
def test_truncate_gives_a_plain_lora_with_the_same_outputs(rank):
    model = _model()
    x = token_input()
    set_rank(model, rank, "dy")
    expected = model(x)
    lora = truncate(model, "dy", rank)
    assert lora.rank == rank and lora.scale == pytest.approx(12.0 / rank)
    layers = [stack[0] for stack in layers_of(model, "dy").values()]
    assert layers and all(type(layer) is LoRALinear and layer.lora_A.shape[0] == rank for layer in layers)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_export_rank_state_loads_into_a_fresh_model():
    model = _model()
    x = token_input()
    set_rank(model, 3, "dy")
    expected = model(x)
    config, state = export_rank(model, "dy", 3)
    from pipelines.adapters import load_adapter_state_dict

    fresh = tiny_net()
    fresh.eval()
    add_adapter(fresh, config, "plain")
    load_adapter_state_dict(fresh, state, "plain")
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)


def test_layer_export_folds_alpha_over_b_into_up_projection():
    layer = _layer()
    down, up = layer.export_lora(rank=2)
    torch.testing.assert_close(down, layer.lora_A.detach()[:2])
    torch.testing.assert_close(up, 6.0 * layer.lora_B.detach()[:, :2])
    layer.eval_rank = 2
    torch.testing.assert_close(up @ down, layer.get_delta_weight())


def test_merge_folds_the_update_at_the_evaluation_rank_and_rank_is_fixed_while_merged():
    model = _model()
    x = token_input()
    set_rank(model, 4, "dy")
    expected = model(x)
    merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(AdapterError, match="unmerge"):
        set_rank(model, 2, "dy")
    unmerge(model)
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("bad", [0, 1, 7, True, 2.0, "3"])
def test_rank_outside_the_range_is_refused_and_the_model_untouched(bad):
    model = _model(rank=6, min_rank=2)
    x = token_input()
    before = model(x)
    with pytest.raises(AdapterError, match="outside the DyLoRA range"):
        set_rank(model, bad, "dy")
    with pytest.raises(AdapterError, match="outside the DyLoRA range"):
        truncate(model, "dy", bad)
    assert adapter_names(model) == ["dy"]
    assert all(type(s[0]) is DyLoRALinear for s in layers_of(model, "dy").values())
    assert torch.equal(model(x), before)


def test_truncating_an_inactive_adapter_keeps_it_inactive():
    model = _model()
    x = token_input()
    set_active(model, [])
    base = model(x)
    truncate(model, "dy", 3)
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("fields, message", [
    ({"rank": 0}, "rank must be at least 1"),
    ({"rank": 4, "min_rank": 5}, "min_rank"),
    ({"alpha": float("nan")}, "alpha"),
    ({"mode": "thawed"}, "mode"),
    ({"init": "ones"}, "init"),
    ({"rank": 3, "rank_weights": [1.0, 1.0]}, "3 weights"),
    ({"rank": 2, "rank_weights": [0.0, 0.0]}, "not all zero"),
    ({"rank": 2, "rank_weights": [1.0, float("inf")]}, "finite"),
])
def test_bad_config_is_refused_with_one_line(fields, message):
    with pytest.raises(AdapterError, match=message):
        DyLoRAConfig(**fields, target_modules=["fc1"])


def test_steps_refuse_an_adapter_of_another_method():
    from pipelines.adapters import LoRAConfig

    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), "plain")
    with pytest.raises(AdapterError, match="not a DyLoRA adapter"):
        set_rank(model, 1, "plain")
    with pytest.raises(AdapterError, match="no adapter named"):
        sample_rank(model, "missing")
