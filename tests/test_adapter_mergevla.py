"""MergeVLA: TALL masks against their formula, retrieval of each task, task arithmetic, experts and the router."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    LoRAConfig,
    MergeVLAConfig,
    adapter_state_dict,
    add_adapter,
    layers_of,
    load_adapter,
    mask_density,
    merge,
    merge_task_adapters,
    merge_task_vectors,
    route,
    save_adapter,
    select_task,
    trainable_parameters,
)
from pipelines.adapters.mergevla import router_vectors, selected_task, tall_masks
from tests.adapter_cases import tiny_net, token_input


def _randomize(model, name, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model, name):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _two_loras():
    model = tiny_net()
    model.eval()
    for i, task in enumerate(("first", "second")):
        add_adapter(model, LoRAConfig(rank=3, scale=0.5, target_modules=["fc1", "fc2"]), name=task)
        _randomize(model, task, seed=i + 1)
    return model


def _delta(model, name, module):
    return layers_of(model, name)[module][0].get_delta_weight()


def test_masks_and_retrieval_follow_the_tall_formula_on_lora_task_vectors():
    model = _two_loras()
    module = "blocks.0.fc1"
    taus = torch.stack([_delta(model, "first", module), _delta(model, "second", module)])
    merge_task_adapters(model, ["first", "second"], MergeVLAConfig(mask_lambda=0.6), name="merged")
    layer = layers_of(model, "merged")[module][0]
    merged = taus.sum(0)
    for t in range(2):
        expected = (taus[t].abs() > 0.6 * (merged - taus[t]).abs()).float()
        assert torch.equal(layer.masks[t], expected)
        select_task(model, "merged", ["first", "second"][t])
        torch.testing.assert_close(layer.get_delta_weight(), expected * merged)
        x = torch.randn(4, 16)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (expected * merged).T)
    torch.testing.assert_close(layer.task_vector.detach(), merged)
    assert 0 < float(layer.masks.mean()) < 1


def test_tall_masks_of_theta_match_the_task_vector_form():
    # 1[|theta_0 - theta_t| > lambda |theta_MTL - theta_t|] with theta_MTL = theta_0 + sum tau
    generator = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, 7, generator=generator)
    taus = torch.randn(3, 5, 7, generator=generator)
    thetas = theta0 + taus
    theta_mtl = theta0 + taus.sum(0)
    expected = (theta0 - thetas).abs() > 0.4 * (theta_mtl - thetas).abs()
    assert torch.equal(tall_masks(taus, taus.sum(0), 0.4), expected)


def test_each_task_is_retrieved_exactly_where_its_mask_covers_its_vector():
    # Task vectors on disjoint entries: every mask is exactly its task's support, so the merged adapter on a
    # task's mask equals that task's own adapter (and task arithmetic is their sum).
    torch.manual_seed(0)
    model = tiny_net()
    model.eval()
    modules = ["blocks.0.fc1", "blocks.1.fc2"]
    shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in modules}
    vectors = {}
    for t, task in enumerate(("even", "odd")):
        vectors[task] = {}
        for m in modules:
            support = (torch.arange(shapes[m][0] * shapes[m][1]).view(shapes[m]) % 2 == t).float()
            vectors[task][m] = 0.2 * torch.randn(shapes[m]) * support
    reference = {task: tiny_net() for task in vectors}
    for task, own in reference.items():
        own.eval()
        with torch.no_grad():
            for m in modules:
                own.get_submodule(m).weight.add_(vectors[task][m])
    merge_task_vectors(model, vectors, MergeVLAConfig(router_k=2), name="merged")
    x = token_input()
    for task in vectors:
        select_task(model, "merged", task)
        assert selected_task(model, "merged") == task
        torch.testing.assert_close(model(x), reference[task](x))
    select_task(model, "merged", None)
    both = tiny_net()
    with torch.no_grad():
        for m in modules:
            both.get_submodule(m).weight.add_(vectors["even"][m] + vectors["odd"][m])
    torch.testing.assert_close(model(x), both(x))


def test_merge_scale_multiplies_the_sum():
    model = _two_loras()
    module = "blocks.1.fc2"
    merged = _delta(model, "first", module) + _delta(model, "second", module)
    merge_task_adapters(model, ["first", "second"], MergeVLAConfig(merge_scale=0.5), name="merged")
    select_task(model, "merged", None)
    torch.testing.assert_close(layers_of(model, "merged")[module][0].get_delta_weight(), 0.5 * merged)


def test_expert_modules_keep_each_task_whole():
    model = _two_loras()
    taus = [_delta(model, t, "blocks.1.fc2") for t in ("first", "second")]
    merge_task_adapters(model, ["first", "second"], MergeVLAConfig(expert_modules=["blocks.1.fc2"]), name="m")
    layer = layers_of(model, "m")["blocks.1.fc2"][0]
    assert layer.expert and not hasattr(layer, "masks")
    for t, task in enumerate(("first", "second")):
        select_task(model, "m", task)
        torch.testing.assert_close(layer.get_delta_weight(), taus[t])
    select_task(model, "m", None)
    torch.testing.assert_close(layer.get_delta_weight(), taus[0] + taus[1])


def test_router_vectors_are_the_top_right_singular_vectors():
    weight = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    rows = router_vectors(weight, 3)
    _, singular, vh = torch.linalg.svd(weight)
    assert rows.shape == (3, 6)
    torch.testing.assert_close(rows @ rows.T, torch.eye(3), atol=1e-5, rtol=0)
    # The same subspace: projecting the top singular vectors onto the rows keeps them whole.
    torch.testing.assert_close((vh[:3] @ rows.T).norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    # ||R h|| is at most ||h||, reaching it on the top vector.
    assert float((rows @ vh[0]).norm()) == pytest.approx(1.0, abs=1e-5)


class Probe(nn.Module):
    """One linear layer read by the router, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        return self.head(torch.relu(self.gate(x)))


@pytest.mark.parametrize("score", ["norm", "relative"])
def test_router_picks_the_task_whose_inputs_it_learned(score):
    # Task "left" changed the gate along input features 0-3, task "right" along features 6-9; the inputs of
    # each task live on its own features, so the router scores each input highest for its own task.
    torch.manual_seed(0)
    model = Probe()
    vectors = {}
    for task, first in (("left", 0), ("right", 6)):
        tau = torch.zeros(12, 12)
        tau[:, first:first + 4] = torch.randn(12, 4)
        vectors[task] = {"gate": tau}
    merge_task_vectors(model, vectors, MergeVLAConfig(router_k=4, router_modules=["gate"], router_score=score),
                       name="merged")
    inputs = torch.zeros(8, 12)
    inputs[:4, 0:4] = torch.randn(4, 4)
    inputs[4:, 6:10] = torch.randn(4, 4)
    routing = route(model, "merged", lambda: model(inputs))
    assert routing.choices == ["left"] * 4 + ["right"] * 4
    assert routing.probabilities.shape == (8, 2)
    torch.testing.assert_close(routing.probabilities.sum(-1), torch.ones(8))
    assert selected_task(model, "merged") is None  # routing leaves the selection as it was


def test_mask_density_counts_the_kept_weights():
    model = _two_loras()
    merge_task_adapters(model, ["first", "second"], name="merged")
    layers = [s[0] for s in layers_of(model, "merged").values()]
    total = sum(layer.masks[0].numel() for layer in layers)
    expected = sum(float(layer.masks[1].sum()) for layer in layers) / total
    assert mask_density(model, "merged")["second"] == pytest.approx(expected)


def test_saved_merge_keeps_masks_and_routers(tmp_path):
    model = _two_loras()
    merge_task_adapters(model, ["first", "second"], MergeVLAConfig(router_k=3), name="merged")
    select_task(model, "merged", "second")
    x = token_input()
    expected = model(x)
    save_adapter(model, tmp_path / "m", "merged")
    fresh = tiny_net()
    fresh.eval()
    load_adapter(fresh, tmp_path / "m")
    assert selected_task(fresh, "merged") is None
    select_task(fresh, "merged", "second")
    assert torch.equal(fresh(x), expected)
    for key, value in adapter_state_dict(model, "merged").items():
        assert torch.equal(adapter_state_dict(fresh, "merged")[key], value)


def test_router_k_above_a_modules_singular_vectors_is_refused_and_the_model_untouched():
    model = _two_loras()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="router_k 20 is more than blocks.0.fc1 has"):
        merge_task_adapters(model, ["first", "second"], MergeVLAConfig(router_k=20), name="merged")
    assert "merged" not in {layer.adapter_name for stack in layers_of(model).values() for layer in stack}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    ({"tasks": ["only"]}, "2 to 64 task names"),
    ({"tasks": ["a", "a"]}, "differ"),
    ({"tasks": ["a", "b/c"]}, "task name"),
    ({"mask_lambda": float("nan")}, "mask_lambda"),
    ({"router_k": 0}, "router_k"),
    ({"router_source": "bias"}, "router_source"),
    ({"router_score": "cosine"}, "router_score"),
])
def test_bad_config_is_one_clear_line(bad, message):
    with pytest.raises(AdapterError, match=message):
        MergeVLAConfig(**bad, target_modules=["fc1"])


def test_selecting_an_unknown_task_or_while_merged_is_refused():
    model = _two_loras()
    merge_task_adapters(model, ["first", "second"], name="merged")
    with pytest.raises(AdapterError, match="no task 'third'.*first, second"):
        select_task(model, "merged", "third")
    merge(model)
    with pytest.raises(AdapterError, match="unmerge"):
        select_task(model, "merged", "first")


def test_merging_fewer_than_two_or_missing_adapters_is_refused():
    model = _two_loras()
    with pytest.raises(AdapterError, match="at least two"):
        merge_task_adapters(model, ["first"])
    with pytest.raises(AdapterError, match="no adapter named 'ghost'"):
        merge_task_adapters(model, ["first", "ghost"])
