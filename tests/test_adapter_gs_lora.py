"""GS-LoRA / GS-LoRA++: the groups, the group lasso (penalty and proximal step), the forgetting terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters import (
    AdamGroupProximal,
    AdapterError,
    GSLoRAConfig,
    GSLoRALinear,
    LoRAConfig,
    add_adapter,
    bounded_forget_loss,
    check_forget_classes,
    class_prototypes,
    forgetting_loss,
    group_lasso,
    group_lasso_weight,
    group_norms,
    lora_groups,
    prototype_distance,
    proximal_group_step,
    zero_groups,
)
from pipelines.adapters.gs_lora import block_of
from tests.adapter_cases import tiny_net, token_input


def _model(grouping="block", seed=0):
    model = tiny_net()
    add_adapter(model, GSLoRAConfig(rank=3, grouping=grouping, target_modules=["fc1", "fc2"]), name="gs")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in lora_groups(model, "gs").values():
            for p in group:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


def test_the_layer_is_loralib_linear_scaled_by_alpha_over_r():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    torch.manual_seed(5)
    layer = GSLoRALinear(base, GSLoRAConfig(rank=4, lora_alpha=2.0))
    bound = 1 / math.sqrt(12)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    assert torch.equal(layer.lora_B, torch.zeros(10, 4))
    torch.manual_seed(5)
    assert torch.equal(GSLoRALinear(base, GSLoRAConfig(rank=4)).lora_A, layer.lora_A)  # drawn from the seed
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), base(x) + 0.5 * x @ (layer.lora_B @ layer.lora_A).T)
    assert GSLoRALinear(nn.Linear(4, 4)).scale == 1 / 8  # rank 8, lora_alpha 1: the official defaults


def test_one_group_per_block_holds_both_feed_forward_loras():
    model = _model()
    groups = lora_groups(model, "gs")
    assert list(groups) == ["blocks.0", "blocks.1"]
    assert [tuple(p.shape) for p in groups["blocks.0"]] == [(3, 16), (32, 3), (3, 32), (16, 3)]
    assert list(lora_groups(_model("module"), "gs")) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1",
                                                         "blocks.1.fc2"]
    assert len(lora_groups(_model("matrix"), "gs")) == 8
    assert block_of("vit.encoder.layer.11.mlp.fc1") == "vit.encoder.layer.11" and block_of("head") == "head"


def test_the_group_lasso_is_the_sum_of_the_groups_l2_norms():
    model = _model()
    groups = lora_groups(model, "gs")
    expected = sum(torch.sqrt(sum((p ** 2).sum() for p in params)) for params in groups.values())
    torch.testing.assert_close(group_lasso(model, "gs"), expected)
    norms = group_norms(model, "gs")
    assert norms == pytest.approx({g: float(torch.cat([p.detach().flatten() for p in ps]).norm()) for g, ps in groups.items()})
    group_lasso(model, "gs").backward()  # differentiable: each group's gradient is theta_g / ||theta_g||
    for params in groups.values():
        norm = torch.sqrt(sum((p.detach() ** 2).sum() for p in params))
        for p in params:
            torch.testing.assert_close(p.grad, p.detach() / norm)


def test_the_proximal_step_zeroes_groups_under_the_threshold_and_shrinks_the_rest():
    model = _model()
    with torch.no_grad():
        for p in lora_groups(model, "gs")["blocks.1"]:
            p.mul_(0.01)
    before = {g: [p.detach().clone() for p in ps] for g, ps in lora_groups(model, "gs").items()}
    norms = group_norms(model, "gs")
    threshold = (norms["blocks.0"] + norms["blocks.1"]) / 2
    assert norms["blocks.1"] < threshold < norms["blocks.0"]
    assert proximal_group_step(model, "gs", threshold) == ["blocks.1"]
    after = lora_groups(model, "gs")
    assert all(torch.equal(p, torch.zeros_like(p)) for p in after["blocks.1"])
    factor = 1 - threshold / norms["blocks.0"]
    for p, old in zip(after["blocks.0"], before["blocks.0"], strict=True):
        torch.testing.assert_close(p, factor * old)
    assert group_norms(model, "gs")["blocks.0"] == pytest.approx(norms["blocks.0"] - threshold, rel=1e-5)
    x = token_input()
    with torch.no_grad():  # a zero group leaves its block as the base computes it
        assert torch.equal(model.blocks[1]["fc1"](x[..., :16]), model.blocks[1]["fc1"].base_layer(x[..., :16]))
    with pytest.raises(AdapterError, match="threshold"):
        proximal_group_step(model, "gs", float("nan"))


def test_the_adam_proximal_step_thresholds_each_group_in_adams_step_size():
    model = _model()
    groups = lora_groups(model, "gs")
    with torch.no_grad():
        for p in groups["blocks.1"]:
            p.mul_(0.01)
    params = [p for ps in groups.values() for p in ps]
    optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)
    proximal = AdamGroupProximal(model, "gs", optimizer)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):  # blocks.0 gets gradients 100 times larger than blocks.1
        for group, ps in groups.items():
            for p in ps:
                p.grad = torch.randn(p.shape, generator=generator) * (1.0 if group == "blocks.0" else 0.01)
        optimizer.step()
        norms = group_norms(model, "gs")
        zero = proximal.step(0.5)
        thresholds = proximal.thresholds(0.5)  # the ones this step used
    for group, ps in groups.items():  # the group's mean bias-corrected second moment, as AdamW holds it
        v = torch.cat([optimizer.state[p]["exp_avg_sq"].flatten() for p in ps]).mean() / (1 - 0.999 ** 3)
        assert thresholds[group] == pytest.approx(0.01 * 0.5 / (float(v.sqrt()) + 1e-8), rel=1e-4)
    assert thresholds["blocks.1"] > 50 * thresholds["blocks.0"]
    assert zero == ["blocks.1"] and norms["blocks.1"] < thresholds["blocks.1"] < norms["blocks.0"]
    assert all(torch.equal(p, torch.zeros_like(p)) for p in groups["blocks.1"])
    assert group_norms(model, "gs")["blocks.0"] == pytest.approx(norms["blocks.0"] - thresholds["blocks.0"],
                                                                  rel=1e-4)
    assert proximal.step(0.0) == []  # no group lasso during the warm-up


def test_zero_groups_lists_only_groups_whose_every_entry_is_zero():
    model = _model()
    groups = lora_groups(model, "gs")
    assert zero_groups(model, "gs") == []
    with torch.no_grad():
        groups["blocks.0"][1].zero_()  # one B zero: the block is unchanged, but its group is not zero
        for p in groups["blocks.1"]:
            p.zero_()
    assert zero_groups(model, "gs") == ["blocks.1"]
    with torch.no_grad():
        groups["blocks.1"][0][0, 0] = 1e-30
    assert zero_groups(model, "gs") == []


def test_the_group_lasso_weight_warms_up():
    assert [group_lasso_weight(e, 0.01, alpha_epoch=3) for e in range(5)] == [0, 0, 0, 0.01, 0.01]


def test_the_forgetting_hinge_stops_at_the_bound():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(bounded_forget_loss(logits, labels, float(ce) + 2.0), torch.tensor(2.0))
    assert float(bounded_forget_loss(logits, labels, float(ce) - 0.1)) == 0.0


def test_prototypes_and_the_official_kl_distance():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(8, 5, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    prototypes = class_prototypes(features, labels, 4)
    torch.testing.assert_close(prototypes[1], features[2:5].mean(0))
    assert torch.equal(prototypes[3], torch.zeros(5))
    p = F.softmax(prototypes[labels], -1)
    q = F.softmax(features, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()  # KL(softmax(p_y) || softmax(f)), batch mean
    torch.testing.assert_close(prototype_distance(features, labels, prototypes), expected)
    torch.testing.assert_close(prototype_distance(features, labels, prototypes, "l2"),
                               (features - prototypes[labels]).pow(2).mean())


def test_the_total_loss_adds_the_terms_with_their_weights():
    generator = torch.Generator().manual_seed(2)
    r_logits, f_logits = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    r_labels, f_labels = torch.tensor([2, 3, 4, 5]), torch.tensor([0, 1, 0, 1])
    r_feat, f_feat = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    prototypes = torch.randn(10, 6, generator=generator)
    parts = forgetting_loss(r_logits, r_labels, f_logits, f_labels, beta=0.2, bnd=5.0, structure=torch.tensor(3.0),
                            alpha=0.1, remain_features=r_feat, forget_features=f_feat, prototypes=prototypes,
                            prototype_forget_weight=0.5, prototype_remain_weight=0.25, bnd_pro=2.0)
    expected = (F.cross_entropy(r_logits, r_labels) + 0.2 * F.relu(5.0 - F.cross_entropy(f_logits, f_labels))
                + 0.1 * 3.0 + 0.5 * F.relu(2.0 - prototype_distance(f_feat, f_labels, prototypes))
                + 0.25 * prototype_distance(r_feat, r_labels, prototypes))
    torch.testing.assert_close(parts["total"], expected)


def test_a_class_to_forget_that_does_not_exist_is_refused_in_one_line():
    assert check_forget_classes([0, 3], 10) == [0, 3]
    with pytest.raises(AdapterError, match="^class 12 does not exist: the model has classes 0 to 9$"):
        check_forget_classes([1, 12], 10)
    for bad in ([True], [-1], ["3"], [1, 1], []):
        with pytest.raises(AdapterError):
            check_forget_classes(bad, 10)


def test_groups_of_another_method_are_refused():
    model = tiny_net()
    add_adapter(model, LoRAConfig(rank=2, target_modules=["fc1"]), name="plain")
    with pytest.raises(AdapterError, match="no GS-LoRA adapter named 'plain'"):
        group_lasso(model, "plain")


@pytest.mark.parametrize("options, field", [
    ({"rank": 0}, "rank"), ({"lora_alpha": 0.0}, "lora_alpha"), ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"grouping": "layer"}, "grouping"),
])
def test_bad_settings_are_refused_naming_the_field(options, field):
    with pytest.raises(AdapterError, match=f"GS-LoRA {field}"):
        GSLoRAConfig(**options)
