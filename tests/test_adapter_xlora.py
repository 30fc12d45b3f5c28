"""X-LoRA behind the registry: its forward equals PEFT's own XLoraModel's (through get_peft_model) bit for bit, in
every classifier mode; experts come from this package's or PEFT's LoRA folders; only the classifier trains; bad
input gets one line and leaves the model as it was. Also pins why PEFT's XLoraModel alone does not serve here."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.adapters import (
    AdapterError,
    LoRAConfig,
    XLoRAConfig,
    adapter_names,
    add_adapter,
    disabled,
    remove_adapter,
    save_adapter,
    set_active,
    trainable_parameters,
    xlora_experts,
    xlora_scalings,
)
from tests.adapter_cases import tiny_llama, tiny_net, token_ids, token_input

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def peft_experts(tmp_path_factory):
    """Three PEFT LoRA experts (random A and B, ranks 2-4) saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for i in range(3):
        torch.manual_seed(10 + i)
        model = get_peft_model(tiny_llama(), LoraConfig(r=2 + i, lora_alpha=4, target_modules=TARGETS,
                                                        init_lora_weights=False))
        folder = tmp_path_factory.mktemp("experts") / f"e{i}"
        model.save_pretrained(folder)
        folders[str(i)] = str(folder)
    return folders


def _peft_xlora(folders, **options):
    from peft import XLoraConfig, get_peft_model

    base = tiny_llama().eval()
    base.config.use_cache = False  # PEFT refuses the model otherwise
    torch.manual_seed(5)
    return get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, adapters=folders, **options)).eval()


def _ours(folders, **options):
    model = tiny_llama().eval()
    names = dict(zip(("copy", "reverse", "sort"), folders.values(), strict=False))
    add_adapter(model, XLoRAConfig.from_adapters(names, **options), name="mix")
    return model


def _classifier(model):
    return next(m.classifier for m in model.modules() if getattr(m, "classifier", None) is not None)


@pytest.mark.parametrize("options", [
    {},
    {"xlora_depth": 3, "xlora_size": 8, "layerwise_scalings": True},
    {"top_k_lora": 1, "enable_softmax_topk": True, "enable_softmax": False},
    {"top_k_lora": 2, "scaling_pass_value": 0.3, "global_scaling_weight": 0.7, "softmax_temperature": 0.5},
])
def test_forward_equals_peft_xlora_model_bit_for_bit(peft_experts, options):
    reference = _peft_xlora(peft_experts, **options)
    ids = token_ids()
    expected = reference(**ids).logits
    ours = _ours(peft_experts, **options)
    _classifier(ours).load_state_dict(reference.base_model.internal_xlora_classifier.state_dict())
    assert torch.equal(ours(**ids).logits, expected)
    assert torch.equal(xlora_scalings(ours, "mix"), reference.base_model.get_latest_scalings())
    assert xlora_experts(ours, "mix") == ["copy", "reverse", "sort"]
    assert ours.config.use_cache is True  # switched off for the call only


def test_experts_from_this_package_mix_as_lora_when_the_classifier_is_sure(tmp_path):
    # An X-LoRA whose classifier always picks expert j computes the model with LoRA j alone (lambda x scales A x).
    folders, alone = {}, {}
    ids = token_ids()
    for j, name in enumerate(("one", "two")):
        model = tiny_llama().eval()
        torch.manual_seed(20 + j)
        add_adapter(model, LoRAConfig(rank=2, scale=1.5, target_modules=TARGETS), name=name)
        with torch.no_grad():
            for p in trainable_parameters(model, name):
                p.normal_(std=0.3)
        save_adapter(model, tmp_path / name, name)
        folders[name] = tmp_path / name
        alone[name] = model(**ids).logits
    mixed = tiny_llama().eval()
    add_adapter(mixed, XLoRAConfig.from_adapters(folders), name="x")
    classifier = _classifier(mixed).layers[-1]
    for j, name in enumerate(folders):
        with torch.no_grad():
            classifier.weight.zero_()
            classifier.bias.copy_(torch.tensor([60.0, 0.0] if j == 0 else [0.0, 60.0]))
        torch.testing.assert_close(mixed(**ids).logits, alone[name], rtol=1e-5, atol=1e-6)


def test_only_the_classifier_trains_unless_the_experts_are_trainable(peft_experts):
    model = _ours(peft_experts)
    params = trainable_parameters(model, "mix")
    assert {id(p) for p in params} == {id(p) for p in _classifier(model).parameters()}
    model.train()
    model(**token_ids()).logits.sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    experts = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert experts and not any(p.requires_grad or p.grad is not None for p in experts)
    trainable = _ours(peft_experts, use_trainable_adapters=True)
    assert len(trainable_parameters(trainable, "mix")) == len(params) + len(experts)


def test_disabled_and_inactive_give_the_base_model(peft_experts):
    base = tiny_llama().eval()(**token_ids()).logits
    model = _ours(peft_experts)
    with disabled(model):
        assert torch.equal(model(**token_ids()).logits, base)
    set_active(model, [])
    assert torch.equal(model(**token_ids()).logits, base)


def test_a_deep_copy_runs_and_is_removed_on_its_own(peft_experts):
    model = _ours(peft_experts)
    ids = token_ids()
    expected = model(**ids).logits
    twin = copy.deepcopy(model)
    assert torch.equal(twin(**ids).logits, expected)
    remove_adapter(twin, "mix")
    assert torch.equal(twin(**ids).logits, tiny_llama().eval()(**ids).logits)
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    assert torch.equal(model(**ids).logits, expected)


def _unchanged(model, state, modules):
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items()) and all(
        modules.get(n) is m for n, m in model.named_modules()) and not model._forward_pre_hooks


def test_top_k_above_the_number_of_experts_is_refused_in_one_line_and_the_model_untouched(peft_experts):
    with pytest.raises(AdapterError) as error:
        XLoRAConfig.from_adapters({"a": peft_experts["0"], "b": peft_experts["1"]}, top_k_lora=3)
    assert str(error.value) == "X-LoRA top_k_lora must be at most the number of experts (2), not 3"
    model = tiny_llama()
    state, modules = {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())
    config = XLoRAConfig.from_adapters({"a": peft_experts["0"], "b": peft_experts["1"]})
    config.top_k_lora = 5
    with pytest.raises(AdapterError, match="top_k_lora must be at most"):
        add_adapter(model, config)
    assert _unchanged(model, state, modules) and adapter_names(model) == []


def test_a_model_without_hidden_states_is_refused_and_left_alone(peft_experts):
    model = tiny_net()
    state, modules = {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())
    config = XLoRAConfig(adapters={"a": ""}, expert_ranks=[2], target_modules=["fc1"])
    with pytest.raises(AdapterError, match="X-LoRA needs a transformers model"):
        add_adapter(model, config)
    assert _unchanged(model, state, modules)
    assert torch.equal(model(token_input()), tiny_net()(token_input()))


def test_bad_experts_get_one_line(peft_experts, tmp_path):
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        XLoRAConfig.from_adapters({"a": tmp_path})
    other = tiny_llama()
    add_adapter(other, LoRAConfig(rank=2, target_modules=["q_proj"]), name="q")
    save_adapter(other, tmp_path / "q", "q")
    with pytest.raises(AdapterError, match="must adapt the same modules"):
        XLoRAConfig.from_adapters({"a": peft_experts["0"], "q": tmp_path / "q"})
    with pytest.raises(AdapterError, match="one value per expert"):
        XLoRAConfig(adapters={"a": "", "b": ""}, expert_ranks=[2], target_modules=TARGETS)
    model = _ours(peft_experts)
    with pytest.raises(AdapterError, match="has an X-LoRA adapter already"):
        add_adapter(model, XLoRAConfig.from_adapters({"a": peft_experts["0"]}), name="again")
    assert adapter_names(model) == ["mix"]


def test_peft_xlora_model_alone_needs_index_names_and_no_cache(peft_experts):
    """Why the registry runs PEFT's layers and classifier rather than its XLoraModel (see xlora.py)."""
    from peft import XLoraConfig, get_peft_model

    cached = tiny_llama()
    with pytest.raises(ValueError, match="use_cache"):
        get_peft_model(cached, XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, adapters=peft_experts))
    named = tiny_llama()
    named.config.use_cache = False
    model = get_peft_model(named, XLoraConfig(task_type="CAUSAL_LM", hidden_size=16,
                                              adapters={"copy": peft_experts["0"], "sort": peft_experts["1"]}))
    with pytest.raises(KeyError):  # experts loaded as "0", "1" but activated as "copy", "sort"
        model(**token_ids())
