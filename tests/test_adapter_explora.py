"""ExPLoRA: the unfrozen block copy, LoRA on Q and V elsewhere, the trainable set, DINO's objective, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.adapters import (
    AdapterError,
    DinoHead,
    ExPLoRAConfig,
    LoRALinear,
    add_adapter,
    count_parameters,
    dino_loss,
    disabled,
    ema_update,
    remove_adapter,
    trainable_parameters,
    update_center,
)
from tests.adapter_cases import STACK_LAYERS, TinyBlock, tiny_stack, token_input


def _explora(**options):
    model = tiny_stack()
    model.eval()
    add_adapter(model, ExPLoRAConfig(rank=2, target_modules=STACK_LAYERS, **options), name="ex")
    return model


def test_the_last_block_trains_in_full_and_the_others_through_lora_on_q_and_v():
    model = _explora()
    unfrozen, lora_blocks = model.layers[3], [model.layers[i] for i in range(3)]
    assert unfrozen.unfrozen and not any(block.unfrozen for block in lora_blocks)
    block_size = sum(p.numel() for p in TinyBlock().parameters())
    lora = 3 * 2 * (2 * (16 + 16))  # three blocks, q and v, rank 2 on 16 -> 16
    norms = 3 * 2 * (16 + 16)  # three blocks, two LayerNorms (weight and bias)
    assert count_parameters(model, "ex") == block_size + lora + norms
    trained = {id(p) for p in trainable_parameters(model, "ex")}
    assert {id(p) for p in unfrozen.view.parameters()} <= trained
    for block in lora_blocks:
        assert isinstance(block.view.q_proj, LoRALinear) and isinstance(block.view.v_proj, LoRALinear)
        assert not isinstance(block.view.fc1, LoRALinear)
        # The LoRA blocks run the model's own frozen weights: nothing is copied.
        assert block.view.fc1.weight is block.base_layer.fc1.weight
        # Their norms train as copies (the paper's "all normalization layers").
        assert block.view.norm1.weight is not block.base_layer.norm1.weight
        assert torch.equal(block.view.norm1.weight, block.base_layer.norm1.weight)
        assert id(block.view.norm2.bias) in trained
        assert block.view.q_proj.original_module().weight is block.base_layer.q_proj.weight
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trained)


def test_norms_can_stay_frozen():
    model = _explora(unfreeze_norms=False)
    block_size = sum(p.numel() for p in TinyBlock().parameters())
    assert count_parameters(model, "ex") == block_size + 3 * 2 * (2 * (16 + 16))
    assert model.layers[0].view.norm1.weight is model.layers[0].base_layer.norm1.weight


def test_a_new_adapter_changes_nothing_and_training_leaves_the_source_blocks_untouched():
    reference = tiny_stack()
    reference.eval()
    model = _explora(unfrozen_blocks=[0, -1])
    x = token_input()
    assert torch.equal(model(x), reference(x))
    optimizer = torch.optim.SGD(trainable_parameters(model, "ex"), lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()
    assert not torch.allclose(model(x), reference(x))
    assert not torch.equal(model.layers[0].view.fc1.weight, model.layers[0].base_layer.fc1.weight)
    with disabled(model):
        assert torch.equal(model(x), reference(x))
    remove_adapter(model, "ex")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))


def test_an_unfrozen_block_that_does_not_exist_is_refused_in_one_line_and_the_model_untouched():
    model = tiny_stack()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"^ExPLoRA unfrozen block 4 does not exist: the targets hold 4 blocks "
                                           r"\(positions 0 to 3, or -1 for the last\)$"):
        add_adapter(model, ExPLoRAConfig(unfrozen_blocks=[4], target_modules=STACK_LAYERS))
    with pytest.raises(AdapterError, match="names a block twice"):
        add_adapter(model, ExPLoRAConfig(unfrozen_blocks=[3, -1], target_modules=STACK_LAYERS))
    with pytest.raises(AdapterError, match="names no Linear layer inside layers.0"):
        add_adapter(model, ExPLoRAConfig(lora_modules=["qkv"], target_modules=STACK_LAYERS))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(type(layer) is TinyBlock for layer in model.layers)


def test_dino_loss_is_the_cross_entropy_between_other_views():
    generator = torch.Generator().manual_seed(0)
    student = [torch.randn(5, 8, generator=generator) for _ in range(2)]
    teacher = [torch.randn(5, 8, generator=generator) for _ in range(2)]
    center = torch.randn(1, 8, generator=generator)
    p = [F.softmax((t - center) / 0.04, -1) for t in teacher]
    q = [F.log_softmax(s / 0.1, -1) for s in student]
    expected = (-(p[0] * q[1]).sum(-1).mean() - (p[1] * q[0]).sum(-1).mean()) / 2
    torch.testing.assert_close(dino_loss(student, teacher, center), expected)
    torch.testing.assert_close(update_center(center, teacher, 0.9),
                               0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True))
    with pytest.raises(AdapterError, match="two views"):
        dino_loss(student[:1], teacher[:1], center)


def test_the_teacher_follows_the_student_by_ema_and_the_head_keeps_a_unit_last_layer():
    teacher, student = [torch.zeros(3)], [torch.ones(3)]
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.1))
    head = DinoHead(16, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    torch.testing.assert_close(head.last.weight.norm(dim=1), torch.ones(10))
    assert not head.last.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("options, field", [
    ({"rank": 0}, "rank"), ({"scale": -1.0}, "scale"), ({"unfrozen_blocks": [True]}, "unfrozen_blocks"),
    ({"unfrozen_blocks": "last"}, "unfrozen_blocks"), ({"lora_modules": [""]}, "lora_modules"),
    ({"unfreeze_norms": 1}, "unfreeze_norms"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"ExPLoRA {field}"):
        ExPLoRAConfig(**options)
