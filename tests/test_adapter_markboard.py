"""Hot-Swap MarkBoard: the branch sum against its formula, the signature round trip through a swap, decoding,
training one branch alone, obfuscation, and bad signatures refused with the model untouched."""

from __future__ import annotations

import pytest
import torch

from pipelines.adapters import (
    AdapterError,
    MarkBoardConfig,
    add_adapter,
    decode_signature,
    deobfuscate,
    disabled,
    get_signature,
    layers_of,
    obfuscate,
    set_signature,
    trigger_labels,
)
from pipelines.adapters.markboard import OFF, training_branch
from tests.adapter_cases import tiny_net, token_input

BITS = 4


def _marked(seed: int = 0, bits: int = BITS, rank: int = 2, scale: float = 0.7):
    """The tiny net with a MarkBoard adapter on its fc layers, every branch's factors random."""
    model = tiny_net().eval()
    torch.manual_seed(seed)
    add_adapter(model, MarkBoardConfig(bits=bits, rank=rank, scale=scale, target_modules=["fc1", "fc2"]), "mark")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in _layers(model):
            layer.lora_A.copy_(0.3 * torch.randn(layer.lora_A.shape, generator=generator))
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
    return model


def _layers(model):
    return [stack[0] for stack in layers_of(model, "mark").values()]


def _expected_delta(layer, signature):
    """scale * sum over the bits that are on of B_{i, s_i} A_{i, s_i}, plus their obfuscation shares."""
    delta = torch.zeros(layer.out_features, layer.in_features)
    for i, bit in enumerate(signature):
        if bit == OFF:
            continue
        delta += layer.scale * layer.lora_B[i, bit].detach() @ layer.lora_A[i, bit].detach()
        delta += layer.obfuscation_B[i] @ layer.obfuscation_A[i]
    return delta


@torch.no_grad()
def test_the_selected_branches_add_their_products_to_the_base_output():
    model = _marked()
    layer = _layers(model)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5))
    for signature in ([1, 0, 0, 1], [0, OFF, 1, OFF]):
        set_signature(model, "mark", signature)
        expected = layer.original_module()(x) + x @ _expected_delta(layer, signature).T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.get_delta_weight(), _expected_delta(layer, signature), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_swap_changes_only_the_signature_and_a_swap_back_gives_the_same_outputs():
    model = _marked()
    x = token_input()
    assert set_signature(model, "mark", "1011") == [1, 0, 1, 1] and get_signature(model, "mark") == [1, 0, 1, 1]
    first = model(x)
    parameters = {name: p.clone() for name, p in model.named_parameters()}
    assert set_signature(model, "mark", [0, 1, None, 1]) == [0, 1, OFF, 1]
    assert get_signature(model, "mark") == [0, 1, OFF, 1]
    assert not torch.allclose(model(x), first)
    assert all(torch.equal(p, parameters[name]) for name, p in model.named_parameters())  # nothing trained
    set_signature(model, "mark", "1011")
    torch.testing.assert_close(model(x), first, atol=0, rtol=0)
    set_signature(model, "mark", "10")  # a shorter signature leaves the remaining bits' branches off
    assert get_signature(model, "mark") == [1, 0, OFF, OFF]


def test_bits_are_read_where_one_branch_label_wins_the_queries():
    labels = torch.tensor([[3, 7], [1, 2], [0, 5]])
    answers = [torch.tensor([7, 7, 7, 3]), torch.tensor([1, 1, 1, 2, 2, 1]), torch.tensor([5, 0, 9, 9])]
    decoded = decode_signature(answers, labels)
    assert decoded.bits == [1, 0, None] and decoded.text == "10-"
    assert decoded.ones == pytest.approx([0.75, 2 / 6, 0.25]) and decoded.zeros == pytest.approx([0.25, 4 / 6, 0.25])


def test_trigger_labels_differ_per_bit_and_keep_out_of_the_avoided_labels():
    labels = trigger_labels(16, 10, seed=3)
    assert labels.shape == (16, 2) and bool((labels[:, 0] != labels[:, 1]).all())
    assert torch.equal(labels, trigger_labels(16, 10, seed=3))
    avoid = torch.zeros(16, 10, dtype=torch.bool)
    avoid[:, :7] = True
    kept = trigger_labels(16, 10, seed=3, avoid=avoid)
    assert bool((kept >= 7).all()) and bool((kept[:, 0] != kept[:, 1]).all())
    avoid[0, 7:9] = True
    with pytest.raises(AdapterError, match="two labels"):
        trigger_labels(16, 10, seed=3, avoid=avoid)


def test_training_one_branch_changes_only_its_factors_and_restores_the_signature():
    model = _marked()
    set_signature(model, "mark", "0110")
    before = {id(layer): (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for layer in _layers(model)}
    with training_branch(model, "mark", 2, 0) as params:
        assert all(layer.signature.tolist() == [OFF, OFF, 0, OFF] for layer in _layers(model))
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
        for _ in range(3):
            optimizer.zero_grad()
            model(token_input()).square().mean().backward()
            optimizer.step()
    for layer in _layers(model):
        old_a, old_b = before[id(layer)]
        changed = (layer.lora_A.detach() != old_a).flatten(2).any(-1) | (layer.lora_B.detach() != old_b).flatten(2).any(-1)
        expected = torch.zeros(BITS, 2, dtype=torch.bool)
        expected[2, 0] = True
        assert torch.equal(changed, expected)
    assert get_signature(model, "mark") == [0, 1, 1, 0]
    with pytest.raises(AdapterError, match="bit must be a whole number from 0 to 3"):
        with training_branch(model, "mark", 4, 0):
            pass


@torch.no_grad()
def test_obfuscation_keeps_every_signature_s_outputs_and_damages_the_base_alone():
    model = _marked()
    x = token_input()
    outputs = {}
    for signature in ("0110", "1001"):
        set_signature(model, "mark", signature)
        outputs[signature] = model(x)
    with disabled(model):
        base = model(x)
    weights = {id(layer): layer.original_module().weight.detach().clone() for layer in _layers(model)}
    obfuscate(model, "mark", strength=0.5, seed=1)
    for signature, expected in outputs.items():
        set_signature(model, "mark", signature)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    for layer in _layers(model):
        weight = weights[id(layer)]
        removed = weight - layer.original_module().weight.detach()
        shares = (layer.obfuscation_B @ layer.obfuscation_A).sum(0)
        torch.testing.assert_close(removed, shares, atol=1e-5, rtol=1e-5)
        assert float(removed.norm()) == pytest.approx(0.5 * float(weight.norm()), rel=1e-4)
    with disabled(model):
        assert not torch.allclose(model(x), base, atol=1e-3)
    with pytest.raises(AdapterError, match="obfuscated already"):
        obfuscate(model, "mark")
    deobfuscate(model, "mark")
    for layer in _layers(model):
        torch.testing.assert_close(layer.original_module().weight.detach(), weights[id(layer)], atol=1e-6, rtol=1e-6)
    with disabled(model):
        torch.testing.assert_close(model(x), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("signature", "message"), [
    ("10110", r"^the signature has 5 bits but the branches hold 4 \(one pair per bit\)"),
    ("10x1", "a signature is a string of 0 and 1"),
    ([1, 2], "signature bits are 0, 1 or None"),
    ([], "the signature is empty"),
])
def test_a_bad_signature_is_refused_in_one_line_and_nothing_changes(signature, message):
    model = _marked()
    set_signature(model, "mark", "0101")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        set_signature(model, "mark", signature)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
