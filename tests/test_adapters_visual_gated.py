"""Visual-gated LoRA: the per-token gate, the two branches, the complementary loss, merge and export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.adapters import VisualGatedConfig, VisualGatedLoRALinear, complementary_loss, visual_gate


def _layer(d: int = 16, content_rank: int = 6, residual_rank: int = 2, **kwargs) -> VisualGatedLoRALinear:
    torch.manual_seed(0)
    layer = VisualGatedLoRALinear(nn.Linear(d, d), VisualGatedConfig(content_rank, residual_rank, **kwargs))
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.normal_()
    return layer


def test_gate_is_per_image_token_in_open_unit_interval_and_depends_on_the_input():
    torch.manual_seed(0)
    features = torch.randn(2, 9, 16) * torch.linspace(0.5, 3.0, 9).view(1, 9, 1)
    gate = visual_gate(features)
    assert gate.shape == (2, 9)
    assert bool((gate > 0).all() and (gate < 1).all())
    assert len(set(gate[0].tolist())) == 9  # one value per token
    # Larger norm, larger gate: the salient tokens go to the content branch.
    norms = features.norm(dim=-1)
    assert torch.equal(gate[0].argsort(), norms[0].argsort())
    other = visual_gate(torch.randn(2, 9, 16))
    assert not torch.allclose(gate, other)


def test_gate_statistics_are_per_image():
    torch.manual_seed(0)
    a, b = torch.randn(1, 8, 16), 10 * torch.randn(1, 8, 16)
    together = visual_gate(torch.cat([a, b]))
    torch.testing.assert_close(together[0], visual_gate(a)[0])
    torch.testing.assert_close(together[1], visual_gate(b)[0])
    # Scaling one image's features does not change its gate: it is z-scored within the image.
    torch.testing.assert_close(visual_gate(3 * a), visual_gate(a))


def test_identical_token_norms_give_gate_one_half():
    features = torch.ones(1, 5, 4)
    torch.testing.assert_close(visual_gate(features), torch.full((1, 5), 0.5))


def test_layer_mixes_branches_per_token_and_text_tokens_use_the_text_gate():
    layer = _layer(text_gate=1.0)
    torch.manual_seed(1)
    x = torch.randn(2, 3 + 7, 16)
    layer.set_token_layout(text_len=3)
    gate = layer.token_gate(x)
    assert gate.shape == (2, 10, 1)
    assert torch.equal(gate[:, :3], torch.ones(2, 3, 1))
    torch.testing.assert_close(gate[:, 3:, 0], visual_gate(x[:, 3:]))
    content, residual = layer.branches(x)
    expected = layer.base_layer(x) + gate * content + (1 - gate) * residual
    torch.testing.assert_close(layer(x), expected)
    # Text tokens see the content branch only, exactly what re-embedding loads.
    torch.testing.assert_close(layer(x)[:, :3], (layer.base_layer(x) + content)[:, :3])


def test_gate_from_block_features_overrides_the_layer_input():
    layer = _layer()
    x = torch.randn(1, 2 + 5, 16)
    block_features = torch.randn(1, 5, 16) * torch.arange(1.0, 6.0).view(1, 5, 1)
    layer.set_token_layout(2, image_features=block_features)
    torch.testing.assert_close(layer.token_gate(x)[0, 2:, 0], visual_gate(block_features)[0])
    layer.clear_token_layout()
    torch.testing.assert_close(layer.token_gate(x)[0, :, 0], visual_gate(x)[0])


def test_gate_needs_token_features():
    with pytest.raises(ValueError):
        _layer()(torch.randn(4, 16))


def test_complementary_loss_is_zero_for_orthogonal_branches_and_positive_otherwise():
    eye = torch.eye(6)
    a, c = eye[:2], eye[2:4]  # orthogonal down projections
    b, d = eye[:, :2] * 3, eye[:, 4:6] * 2  # orthogonal up projections, updates with disjoint support
    assert complementary_loss(a, b, c, d).item() == 0.0
    assert complementary_loss(a, b, a, d).item() > 0  # shared down direction
    assert complementary_loss(a, b, c, b).item() > 0  # shared up direction
    torch.manual_seed(0)
    assert complementary_loss(*(torch.randn(s) for s in [(2, 6), (6, 2), (2, 6), (6, 2)])).item() > 0


def test_complementary_loss_has_gradients_for_all_four_factors():
    layer = _layer()
    layer.complementary_loss().backward()
    for name in ("lora_A_content", "lora_B_content", "lora_A_residual", "lora_B_residual"):
        assert getattr(layer, name).grad is not None and getattr(layer, name).grad.abs().sum() > 0


def test_export_concatenates_both_branches_as_one_lora():
    layer = _layer(content_rank=6, residual_rank=2)
    a, b = layer.export_lora()
    assert a.shape == (8, 16) and b.shape == (16, 8)
    content = layer.lora_B_content @ layer.lora_A_content
    residual = layer.lora_B_residual @ layer.lora_A_residual
    torch.testing.assert_close(b @ a, content + residual)
    a, b = layer.export_lora(export_gate=0.25)
    torch.testing.assert_close(b @ a, 0.25 * content + 0.75 * residual)
    a, b = layer.export_content_branch()
    assert a.shape == (6, 16)
    torch.testing.assert_close(b @ a, content)


def test_merge_unmerge_round_trips_exactly():
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(1, 4, 16)
    layer.merge(export_gate=0.5)
    a, b = layer.export_lora(export_gate=0.5)
    torch.testing.assert_close(layer.base_layer.weight, original + b @ a)
    torch.testing.assert_close(layer(x), x @ (original + b @ a).T + layer.base_layer.bias)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
