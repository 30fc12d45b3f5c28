"""MixLoRA's equations on random tensors: top-k routing, the load-balance loss on known logits, the expert block
against its explicit formula; and its bad input (top-k above the number of experts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.adapters import (
    AdapterError,
    MixLoRAConfig,
    MixLoRAMoE,
    adapter_names,
    add_adapter,
    mixlora_aux_loss,
    mixlora_expert_loads,
    trainable_parameters,
)
from pipelines.adapters.mixlora import load_balancing_loss, topk_routing
from tests.adapter_cases import tiny_llama, token_ids


def _randomize(model, seed=3, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=generator))


def test_router_keeps_the_top_k_softmax_probabilities_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 3.5]])
    weights, experts = topk_routing(logits, 2)
    assert experts.tolist() == [[0, 1], [3, 1]]
    # p_e / (p_0 + p_1) of a softmax is e^{l_e} / (e^{l_0} + e^{l_1}).
    torch.testing.assert_close(weights[0], torch.tensor([math.e ** 2, math.e]) / (math.e ** 2 + math.e))
    torch.testing.assert_close(weights[1], torch.tensor([math.e ** 3.5, math.e ** 3]) / (math.e ** 3.5 + math.e ** 3))
    assert torch.allclose(weights.sum(-1), torch.ones(2))


def _explicit_balance_loss(logits, num_experts, top_k, mask=None):
    rows = [i for i in range(len(logits)) if mask is None or mask[i]]
    probabilities = [F.softmax(logits[i], -1) for i in rows]
    total = 0.0
    for slot in range(top_k):
        for expert in range(num_experts):
            f = sum(int(torch.topk(p, top_k).indices[slot] == expert) for p in probabilities) / len(rows)
            share = sum(float(p[expert]) for p in probabilities) / len(rows)
            total += f * share
    return num_experts * total


def test_load_balance_loss_on_known_logits():
    # Two tokens, two experts, top-1, each token sure of a different expert: f = P = (1/2, 1/2), so L = 2 * 1/2 = 1.
    balanced = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    assert float(load_balancing_loss(balanced, 2, 1)) == pytest.approx(1.0)
    # Every token sure of expert 0: f = (1, 0), P = (1, 0), so L = E = 2: collapse costs most.
    collapsed = torch.tensor([[50.0, -50.0], [50.0, -50.0]])
    assert float(load_balancing_loss(collapsed, 2, 1)) == pytest.approx(2.0)
    # Uniform probabilities: L = E * sum_slot sum_e f P = E * k * (1 / E) = k whatever the choice.
    assert float(load_balancing_loss(torch.zeros(6, 4), 4, 2)) == pytest.approx(2.0)


def test_load_balance_loss_matches_its_formula_over_layers_and_without_padding():
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(2 * 5, 4, generator=generator) for _ in range(3)]  # three layers of batch 2 x seq 5
    stacked = torch.cat(layers)
    assert float(load_balancing_loss(layers, 4, 2)) == pytest.approx(_explicit_balance_loss(stacked, 4, 2), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    repeated = mask.reshape(-1).repeat(3).bool()
    assert float(load_balancing_loss(layers, 4, 2, mask)) == pytest.approx(
        _explicit_balance_loss(stacked, 4, 2, repeated), rel=1e-5)


def test_expert_block_computes_the_mixture_of_its_experts():
    model = tiny_llama().eval()
    config = MixLoRAConfig(num_experts=3, top_k=2, rank=2, alpha=3.0, dropout=0.0, target_modules=["mlp"])
    add_adapter(model, config)
    _randomize(model)
    layer: MixLoRAMoE = model.model.layers[0].mlp
    block = layer.base_layer
    h = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    out = layer(h)

    scale = 3.0 / 2
    for b in range(2):
        for t in range(4):
            x = h[b, t]
            p = F.softmax(layer.router.weight @ x, -1)
            top = torch.topk(p, 2)
            expected = torch.zeros(16)
            for weight, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
                lora = layer.experts[e]

                def branch(name, v, lora=lora):
                    return scale * lora[name].lora_B @ (lora[name].lora_A @ v)

                gate = block.gate_proj.weight @ x + branch("gate_proj", x)
                up = block.up_proj.weight @ x + branch("up_proj", x)
                inner = F.silu(gate) * up
                expected += weight * (block.down_proj.weight @ inner + branch("down_proj", inner))
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-6)


def test_a_new_adapter_leaves_the_outputs_unchanged_up_to_rounding():
    model = tiny_llama().eval()
    inputs = token_ids()
    before = model(**inputs).logits
    add_adapter(model, MixLoRAConfig(num_experts=4, top_k=2, rank=2, target_modules=["q_proj", "o_proj", "mlp"]))
    torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-6)


def test_router_starts_as_the_official_normal_init():
    model = tiny_llama()
    torch.manual_seed(0)
    add_adapter(model, MixLoRAConfig(num_experts=64, top_k=2, rank=2, router_init_range=0.02, target_modules=["mlp"]))
    weights = torch.cat([model.model.layers[i].mlp.router.weight.detach().flatten() for i in range(2)])
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002
    assert all(not e[name].lora_B.detach().any() for e in model.model.layers[0].mlp.experts for name in e)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())


def _unchanged(model, snapshot):
    state, modules = snapshot
    now = model.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state) and all(
        modules.get(n) is m for n, m in model.named_modules())


def test_top_k_above_the_number_of_experts_is_refused_in_one_line_and_the_model_untouched():
    with pytest.raises(AdapterError) as error:
        MixLoRAConfig(num_experts=4, top_k=5, target_modules=["mlp"])
    assert str(error.value) == "MixLoRA top_k must be at most num_experts (4), not 5"
    # A config changed after it was made is checked again before the model is touched.
    model = tiny_llama()
    snapshot = _snapshot(model)
    config = MixLoRAConfig(num_experts=4, top_k=2, rank=2, target_modules=["q_proj", "mlp"])
    config.top_k = 9
    with pytest.raises(AdapterError, match="top_k must be at most num_experts"):
        add_adapter(model, config)
    assert _unchanged(model, snapshot) and adapter_names(model) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("top_k", 0, "top_k must be a whole number of at least 1"),
    ("num_experts", True, "num_experts must be a whole number"),
    ("router_aux_loss_coef", float("nan"), "router_aux_loss_coef must be a finite number"),
    ("expert_modules", ["fc1"], "expert_modules must be one of"),
    ("jitter_noise", 1.0, "jitter_noise must be a finite number in [0, 1)"),
])
def test_bad_fields_get_one_line_naming_them(field, value, message):
    with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        MixLoRAConfig(**{field: value}, target_modules=["mlp"])


def test_a_block_and_a_projection_inside_it_are_not_both_targets():
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="leave model.layers.0.mlp.gate_proj out"):
        add_adapter(model, MixLoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["mlp", "gate_proj"]))
    assert _unchanged(model, snapshot)


def test_aux_loss_reaches_the_router_and_is_zero_when_switched_off():
    model = tiny_llama().train()
    add_adapter(model, MixLoRAConfig(num_experts=4, top_k=2, rank=2, router_aux_loss_coef=0.01,
                                     target_modules=["mlp"]))
    inputs = token_ids()
    model(**inputs)
    loss = mixlora_aux_loss(model)
    logits = [model.model.layers[i].mlp.last_router_logits for i in range(2)]
    assert float(loss) == pytest.approx(0.01 * float(load_balancing_loss(logits, 4, 2)))
    loss.backward()
    assert float(model.model.layers[0].mlp.router.weight.grad.abs().sum()) > 0
    off = tiny_llama()
    add_adapter(off, MixLoRAConfig(num_experts=4, top_k=2, rank=2, router_loss=False, target_modules=["mlp"]))
    off(**inputs)
    assert float(mixlora_aux_loss(off)) == 0.0


def test_jitter_noise_is_drawn_in_training_only():
    model = tiny_llama()
    add_adapter(model, MixLoRAConfig(num_experts=4, top_k=2, rank=2, jitter_noise=0.5, dropout=0.0,
                                     target_modules=["mlp"]))
    _randomize(model)
    inputs = token_ids()
    model.eval()
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


def test_expert_loads_sum_to_one_and_leave_padding_out():
    model = tiny_llama().eval()
    add_adapter(model, MixLoRAConfig(num_experts=4, top_k=2, rank=2, target_modules=["mlp"]))
    _randomize(model, std=1.0)
    ids = token_ids()["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    model(input_ids=ids, attention_mask=mask)
    loads = mixlora_expert_loads(model, attention_mask=mask)
    layer = model.model.layers[1].mlp
    _, chosen = topk_routing(layer.last_router_logits, 2)
    kept = chosen[mask.reshape(-1).bool()]
    expected = torch.bincount(kept.reshape(-1), minlength=4).float() / kept.numel()
    torch.testing.assert_close(loads["model.layers.1.mlp"], expected)
    assert all(float(v.sum()) == pytest.approx(1.0) for v in loads.values())
