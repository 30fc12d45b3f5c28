"""Relaxed Recursive Transformers: the tied block, its initialisations, the per-depth SVD LoRA, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipelines.adapters import (
    AdapterError,
    LoRAConfig,
    RelaxedRecursiveConfig,
    adapter_state_dict,
    add_adapter,
    disabled,
    layers_of,
    repeated_layers,
    tied_parameter_count,
    trainable_parameters,
)
from pipelines.adapters.relaxed_recursive import svd_lora_init, tie_sources
from tests.adapter_cases import STACK_LAYERS, TinyBlock, tiny_stack, token_input


def _tied(rank=0, **options):
    model = tiny_stack()
    model.eval()
    add_adapter(model, RelaxedRecursiveConfig(rank=rank, target_modules=STACK_LAYERS, **options), name="rrt")
    return model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snapshot):
    state, kinds = snapshot
    return (set(model.state_dict()) == set(state) and all(torch.equal(v, state[k]) for k, v in
                                                          model.state_dict().items())
            and [type(m) for m in model.modules()] == kinds)


def test_the_paper_initialisations_pick_the_layers_of_its_figure_2():
    # Six layers looped twice (K = 3): Stepwise 1, 3, 6 (first and last kept); Average (1,4) (2,5) (3,6); Lower 1-3.
    assert tie_sources(6, 2, "stepwise") == [[0], [2], [5]]
    assert tie_sources(6, 2, "average") == [[0, 3], [1, 4], [2, 5]]
    assert tie_sources(6, 2, "lower") == [[0], [1], [2]]
    assert tie_sources(6, 2, "stepwise", "fixed-start") == [[0], [2], [4]]
    # Gemma 2B, 18 layers into 2 blocks of 9: every second layer, the last one kept.
    assert tie_sources(18, 2, "stepwise") == [[0], [2], [4], [6], [8], [10], [12], [14], [17]]
    assert tie_sources(4, 4, "stepwise") == [[0]]


def test_zero_rank_is_the_tied_model_with_averaged_layers():
    model = _tied(rank=0)
    reference = tiny_stack()
    reference.eval()
    originals = [dict(layer.named_parameters()) for layer in reference.layers]
    tied = copy.deepcopy(reference)
    with torch.no_grad():
        for depth, layer in enumerate(tied.layers):
            k = depth % 2
            for name, p in layer.named_parameters():
                p.copy_((originals[k][name] + originals[k + 2][name]) / 2)
    x = token_input()
    torch.testing.assert_close(model(x), tied(x), rtol=1e-6, atol=1e-6)
    # One block of two layers: depths 0 and 2 run the very same tensors.
    first, third = model.layers[0].view, model.layers[2].view
    assert first.fc1.weight is third.fc1.weight and first.norm1.weight is third.norm1.weight
    assert not [n for n, _ in first.named_parameters() if "lora" in n]  # no LoRA at rank 0


def test_full_rank_reproduces_the_original_layers():
    reference = tiny_stack()
    reference.eval()
    x = token_input()
    expected = reference(x)
    relaxed = _tied(rank=16, relax_vectors=True)
    torch.testing.assert_close(relaxed(x), expected, rtol=1e-5, atol=1e-5)
    for init in ("stepwise", "lower"):
        torch.testing.assert_close(_tied(rank=16, relax_vectors=True, init=init)(x), expected, rtol=1e-5, atol=1e-5)
    # Without the offsets (the paper's tying of norms and biases) full rank matches only where those agree.
    same_vectors = tiny_stack()
    with torch.no_grad():
        for layer in same_vectors.layers:
            for name, p in layer.named_parameters():
                if p.ndim == 1:
                    p.copy_(dict(same_vectors.layers[0].named_parameters())[name])
    same_vectors.eval()
    expected = same_vectors(x)
    add_adapter(same_vectors, RelaxedRecursiveConfig(rank=16, target_modules=STACK_LAYERS), name="rrt")
    torch.testing.assert_close(same_vectors(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_tied(rank=16)(x), reference(x), atol=1e-3)


def test_the_lora_starts_at_the_truncated_svd_of_the_residual():
    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(12, 9, generator=generator)
    down, up = svd_lora_init(residual, 3)
    assert down.shape == (3, 9) and up.shape == (12, 3)
    singular = torch.linalg.svdvals(residual)
    # Eckart-Young: the best rank-3 approximation leaves exactly the other singular values.
    torch.testing.assert_close(torch.linalg.matrix_norm(residual - up @ down), singular[3:].norm(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(down @ down.T, torch.eye(3), rtol=1e-5, atol=1e-5)  # A = V_r^T, orthonormal rows
    torch.testing.assert_close(up.norm(dim=0), singular[:3], rtol=1e-5, atol=1e-5)  # B = U_r S_r
    down, up = svd_lora_init(residual, 50)  # beyond full rank: min(12, 9)
    assert down.shape == (9, 9)
    torch.testing.assert_close(up @ down, residual, rtol=1e-5, atol=1e-5)


def test_a_layer_the_init_copied_gets_the_standard_zero_init():
    # Stepwise with 4 layers in 2 loops takes layers 0 and 3: depths 0 and 3 equal their shared layer exactly.
    model = _tied(rank=4, init="stepwise")
    for depth in (0, 3):
        fc1 = model.layers[depth].view.fc1
        assert torch.equal(fc1.lora_B, torch.zeros_like(fc1.lora_B)) and fc1.lora_A.abs().sum() > 0
    fc1 = model.layers[1].view.fc1
    assert fc1.lora_B.abs().sum() > 0
    zero = _tied(rank=4, lora_init="zero")
    assert all(torch.equal(layer.view.fc1.lora_B, torch.zeros(32, 4)) for layer in zero.layers)


def test_uptraining_trains_the_shared_block_and_every_depths_lora():
    model = _tied(rank=2)
    params = trainable_parameters(model, "rrt")
    shared_fc1 = model.layers[0].view.fc1.linear.weight
    assert any(p is shared_fc1 for p in params)
    assert len(params) == len({id(p) for p in params})  # each shared tensor once
    model(token_input()).square().mean().backward()
    # The shared weight is used at depths 0 and 2: its gradient is the sum of both.
    assert shared_fc1.grad is not None and model.layers[2].view.fc1.lora_A.grad is not None
    others = {id(p) for p in params}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in others)


def test_the_saved_state_holds_each_shared_tensor_once_and_the_count_leaves_out_the_originals():
    model = _tied(rank=2)
    state = adapter_state_dict(model, "rrt")
    assert "layers.0.view.fc1.linear.weight" in state and "layers.2.view.fc1.linear.weight" not in state
    assert "layers.2.view.fc1.lora_A" in state
    block = sum(p.numel() for p in TinyBlock().parameters())
    lora = 4 * 2 * ((16 + 16) + (16 + 16) + (16 + 32) + (32 + 16))  # 4 depths, rank 2, q, v, fc1, fc2
    outside = sum(p.numel() for n, p in tiny_stack().named_parameters() if not n.startswith("layers."))
    assert tied_parameter_count(model, "rrt") == outside + 2 * block + lora


def test_disabled_is_the_original_model_bit_for_bit():
    reference = tiny_stack()
    reference.eval()
    model = _tied(rank=2)
    x = token_input()
    with disabled(model):
        assert torch.equal(model(x), reference(x))


def test_repeated_layers_finds_the_stack():
    assert repeated_layers(tiny_stack()) == STACK_LAYERS


def test_layers_of_different_shapes_are_refused_in_one_line_and_the_model_is_untouched():
    model = tiny_stack()
    model.layers[3] = TinyBlock(16, hidden=24)
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match=r"^Relaxed Recursive: layers.0 and layers.3 differ in fc1.bias; only "
                                          r"layers of one kind and shape can be tied$"):
        add_adapter(model, RelaxedRecursiveConfig(rank=2, target_modules=STACK_LAYERS))
    assert _unchanged(model, snapshot)


def test_a_model_without_a_layer_list_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="^Sequential has no list of identical layers to tie; name the layers in "
                                           "target_modules$"):
        repeated_layers(model)
    with pytest.raises(AdapterError, match="differ"):
        add_adapter(model, RelaxedRecursiveConfig(rank=2, target_modules=["0", "2"]))
    assert _unchanged(model, snapshot)


def test_a_layer_count_that_loops_do_not_divide_is_refused():
    model = tiny_stack()
    snapshot = _snapshot(model)
    with pytest.raises(AdapterError, match="cannot tie 3 layers into 2 loops"):
        add_adapter(model, RelaxedRecursiveConfig(rank=2, target_modules=STACK_LAYERS[:3]))
    with pytest.raises(AdapterError, match="cannot tie 4 layers into 3 loops"):
        add_adapter(model, RelaxedRecursiveConfig(loops=3, rank=2, target_modules=STACK_LAYERS))
    with pytest.raises(AdapterError, match="names no Linear layer inside layers.0"):
        add_adapter(model, RelaxedRecursiveConfig(rank=2, lora_targets=["nope"], target_modules=STACK_LAYERS))
    assert _unchanged(model, snapshot)


def test_layers_that_carry_adapters_already_are_refused():
    model = tiny_stack()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="lora")
    with pytest.raises(AdapterError, match="already carries an adapter"):
        add_adapter(model, RelaxedRecursiveConfig(rank=2, target_modules=STACK_LAYERS))
    assert list(layers_of(model)) == [f"{n}.fc1" for n in STACK_LAYERS]


@pytest.mark.parametrize("options, field", [
    ({"loops": 1}, "loops"), ({"loops": True}, "loops"), ({"rank": -1}, "rank"), ({"init": "random"}, "init"),
    ({"stepwise_rule": "odd"}, "stepwise_rule"), ({"lora_init": "pissa"}, "lora_init"),
    ({"norm_init": "zero"}, "norm_init"), ({"relax_vectors": 1}, "relax_vectors"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"Relaxed Recursive {field}"):
        RelaxedRecursiveConfig(**options)
