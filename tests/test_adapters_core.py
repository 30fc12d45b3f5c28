"""The adapter verbs on every registered method: identity, disabled, merge, save/load, remove, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.adapters import (
    METHODS,
    AdapterError,
    LoRAConfig,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    disabled,
    layers_of,
    load_adapter,
    load_adapter_state_dict,
    merge,
    remove_adapter,
    save_adapter,
    set_active,
    trainable_parameters,
    unmerge,
)
from tests.adapter_cases import CASES, Case, tiny_net, token_input

ALL = sorted(METHODS)


def _setup(method: str):
    case: Case = CASES[method]
    info = METHODS[method]
    model = case.model()
    model.eval()
    config = info.config_cls(**case.config, target_modules=case.targets)
    return case, info, model, config


def _randomize(model, name="default", seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model, name):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules()), \
        {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    state, modules, flags = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert all(modules[n] is m for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_every_registered_method_has_a_case():
    assert set(METHODS) <= set(CASES), sorted(set(METHODS) - set(CASES))


@pytest.mark.parametrize("method", ALL)
def test_registry_entry_describes_the_method(method):
    info = METHODS[method]
    assert info.config_cls.method == method
    assert info.title and info.paper and info.property


@pytest.mark.parametrize("method", ALL)
def test_new_adapter_is_identity_where_the_method_starts_at_identity(method):
    case, info, model, config = _setup(method)
    x = case.inputs()
    before = case.call(model, x)
    names = add_adapter(model, config)
    assert names and all(n.endswith(tuple(case.targets)) for n in names)
    after = case.call(model, x)
    if info.identity_at_init:
        assert torch.equal(after, before)
    assert trainable_parameters(model)
    assert all(p.requires_grad for p in trainable_parameters(model))
    others = {id(p) for p in trainable_parameters(model)}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in others)


@pytest.mark.parametrize("method", ALL)
def test_disabled_gives_the_base_model_bit_for_bit(method):
    case, info, model, config = _setup(method)
    x = case.inputs()
    base = case.call(model, x)
    add_adapter(model, config)
    _randomize(model)
    adapted = case.call(model, x)
    assert not torch.allclose(adapted, base)
    with disabled(model):
        assert torch.equal(case.call(model, x), base)
    assert torch.equal(case.call(model, x), adapted)


@pytest.mark.parametrize("method", [m for m in ALL if METHODS[m].mergeable])
def test_merge_keeps_outputs_and_unmerge_restores_the_weights_exactly(method):
    case, info, model, config = _setup(method)
    x = case.inputs()
    base = case.call(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, config)
    _randomize(model)
    adapted = case.call(model, x)
    merge(model)
    torch.testing.assert_close(case.call(model, x), adapted, rtol=1e-4, atol=1e-5)
    with disabled(model):  # the base, bit for bit, even while merged
        assert torch.equal(case.call(model, x), base)
    torch.testing.assert_close(case.call(model, x), adapted, rtol=1e-4, atol=1e-5)
    unmerge(model)
    assert torch.equal(case.call(model, x), adapted)
    remove_adapter(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)


@pytest.mark.parametrize("method", [m for m in ALL if not METHODS[m].mergeable])
def test_methods_that_do_not_merge_refuse_to(method):
    case, info, model, config = _setup(method)
    add_adapter(model, config)
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge(model)


@pytest.mark.parametrize("method", ALL)
def test_save_and_load_on_a_fresh_model_give_the_same_outputs(method, tmp_path):
    case, info, model, config = _setup(method)
    x = case.inputs()
    add_adapter(model, config, name="mine")
    _randomize(model, "mine")
    expected = case.call(model, x)
    save_adapter(model, tmp_path / "a", "mine")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["method"] == method and saved["name"] == "mine"

    fresh = case.model()
    fresh.eval()
    assert load_adapter(fresh, tmp_path / "a") == "mine"
    assert torch.equal(case.call(fresh, x), expected)
    assert type(fresh.get_submodule(saved["modules"][0])) is type(model.get_submodule(saved["modules"][0]))
    for key, value in adapter_state_dict(model, "mine").items():
        assert torch.equal(adapter_state_dict(fresh, "mine")[key], value)


@pytest.mark.parametrize("method", ALL)
def test_remove_gives_back_the_original_modules(method):
    case, info, model, config = _setup(method)
    snapshot = _snapshot(model)
    add_adapter(model, config)
    _randomize(model)
    remove_adapter(model)
    _assert_unchanged(model, snapshot)
    assert adapter_names(model) == []


@pytest.mark.parametrize("method", ALL)
def test_config_naming_no_module_is_refused_and_the_model_untouched(method):
    case, info, model, _ = _setup(method)
    snapshot = _snapshot(model)
    config = info.config_cls(**case.config, target_modules=["no_such_layer"])
    with pytest.raises(AdapterError, match="names no module"):
        add_adapter(model, config)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("method", ALL)
def test_adapter_file_of_wrong_shapes_is_refused_and_the_model_untouched(method, tmp_path):
    case, info, model, config = _setup(method)
    add_adapter(model, config)
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = sorted(state)[0]
    state[key] = torch.zeros(*[s + 1 for s in state[key].shape])
    save_file(state, tmp_path / "a" / "adapter_model.safetensors")
    fresh = case.model()
    snapshot = _snapshot(fresh)
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(fresh, tmp_path / "a")
    _assert_unchanged(fresh, snapshot)


def test_state_of_another_method_is_refused_before_anything_changes():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="a")
    other = tiny_net()
    from pipelines.adapters import RankConstrainedConfig

    add_adapter(other, RankConstrainedConfig(rank=4, alpha=1, target_modules=["fc1"]), name="a")
    before = {k: v.clone() for k, v in adapter_state_dict(model, "a").items()}
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_state_dict(model, adapter_state_dict(other, "a"), "a")
    assert all(torch.equal(adapter_state_dict(model, "a")[k], v) for k, v in before.items())


def test_non_finite_or_integer_tensors_are_refused():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]))
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter_state_dict(model, state)
    state[key] = torch.ones_like(state[key], dtype=torch.int8)
    with pytest.raises(AdapterError, match="floating point"):
        load_adapter_state_dict(model, state)


def test_several_named_adapters_share_a_module_and_set_active_chooses():
    model = tiny_net()
    x = token_input()
    base = model(x)
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="a")
    add_adapter(model, LoRAConfig(rank=3, target_modules=["fc1", "fc2"]), name="b")
    _randomize(model, "a", seed=1)
    _randomize(model, "b", seed=2)
    assert adapter_names(model) == ["a", "b"]
    both = model(x)
    set_active(model, ["a"])
    only_a = model(x)
    set_active(model, "b")
    only_b = model(x)
    set_active(model, [])
    assert torch.equal(model(x), base)
    assert len({tuple(t.flatten()[:4].tolist()) for t in (both, only_a, only_b, base)}) == 4
    # Removing the inner adapter keeps the outer one working as before.
    set_active(model, ["a", "b"])
    remove_adapter(model, "a")
    torch.testing.assert_close(model(x), only_b)
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        set_active(model, "a")


def test_merging_two_adapters_on_one_module_unmerges_exactly():
    model = tiny_net()
    x = token_input()
    weight = model.blocks[0]["fc1"].weight.detach().clone()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="a")
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="b")
    _randomize(model, "a", seed=1)
    _randomize(model, "b", seed=2)
    expected = model(x)
    merge(model, ["b"])
    merge(model, ["a"])
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    unmerge(model)
    assert torch.equal(model.blocks[0]["fc1"].original_module().weight, weight)
    assert torch.equal(model(x), expected)


def test_adding_a_name_twice_or_a_bad_name_is_refused():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="a")
    with pytest.raises(AdapterError, match="already"):
        add_adapter(model, LoRAConfig(rank=2, target_modules=["fc2"]), name="a")
    for bad in ("a\n", "../x", "", "x" * 65):
        with pytest.raises(AdapterError, match="adapter name"):
            add_adapter(model, LoRAConfig(rank=2, target_modules=["fc2"]), name=bad)


def test_targets_match_by_suffix_or_whole_name_pattern():
    model = tiny_net()
    assert add_adapter(model, LoRAConfig(rank=2, target_modules=r"blocks\.1\.fc[12]"), "r") == [
        "blocks.1.fc1", "blocks.1.fc2"]
    assert add_adapter(model, LoRAConfig(rank=2, target_modules=["fc2"], exclude_modules=["blocks.0.fc2"]),
                       "s") == ["blocks.1.fc2"]
    # A pattern must match the whole name: "fc1" alone names nothing.
    with pytest.raises(AdapterError):
        add_adapter(model, LoRAConfig(rank=2, target_modules="fc1"), "t")


def test_load_refuses_a_folder_without_config_or_of_an_unknown_method(tmp_path):
    model = tiny_net()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]))
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["method"] = "no-such-method"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    fresh = tiny_net()
    with pytest.raises(AdapterError, match="does not know"):
        load_adapter(fresh, tmp_path / "a")
    assert adapter_names(fresh) == []


def test_a_module_shared_by_two_places_gets_an_adapter_per_place():
    shared = torch.nn.Linear(16, 16)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    x = token_input()
    base = model(x)
    assert add_adapter(model, LoRAConfig(rank=2, target_modules=r"[02]")) == ["0", "2"]
    assert model[0] is not model[2] and model[0].base_layer is model[2].base_layer is shared
    _randomize(model)
    assert not torch.allclose(model(x), base)
    remove_adapter(model)
    assert model[0] is shared and model[2] is shared
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("method", ALL)
def test_a_new_adapter_follows_the_mode_of_the_model_it_joins(method):
    case, info, model, config = _setup(method)
    model.eval()
    add_adapter(model, config, name="e")
    assert not any(m.training for m in model.modules())
    fresh = case.model()
    fresh.train()
    add_adapter(fresh, config, name="t")
    assert all(stack[0].training for stack in layers_of(fresh, "t").values())
