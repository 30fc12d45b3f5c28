"""The cost model: FLOPs counted on the meta device are the real step's, backward only as far as adapters need."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipelines.adapters import LoRAConfig, LoRALinear
from pipelines.cost import (
    StepCost,
    blora_step_cost,
    count_step,
    fraction_of_floor,
    gpu_spec,
    splitflux_step_cost,
)
from tests.conftest import EXAMPLES


def test_a_frozen_stack_with_one_adapter_counts_2mnk_forward_and_only_the_adapters_backward():
    m, d_in, d, d_out, r = 8, 32, 64, 16, 4
    torch.manual_seed(0)
    first, middle, last = torch.nn.Linear(d_in, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d_out)
    model = torch.nn.Sequential(first, LoRALinear(middle, LoRAConfig(rank=r)), last).to("meta")
    model.requires_grad_(False)
    adapter = model[1]
    for p in adapter.parameters(recurse=False):
        p.requires_grad_(True)

    counts = count_step(model, lambda: model(torch.empty(m, d_in, device="meta")).sum(), [], list(adapter.parameters(recurse=False)))

    assert counts["forward_flops"] == 2 * m * (d_in * d + d * d + d * r + r * d + d * d_out)
    # Backward: the last layer's input gradient (no weight gradient: frozen), lora_B's weight gradient, the
    # gradient into lora_A's output and lora_A's weight gradient; nothing for the frozen layers before it.
    assert counts["backward_flops"] == 2 * m * (d_out * d + d * r + d * r + r * d)


def test_only_what_the_backward_pass_needs_is_kept_and_weights_are_not_counted():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).to("meta")
    model.requires_grad_(False)
    weight = model[2].weight.requires_grad_(True)
    counts = count_step(model, lambda: model(torch.empty(4, 16, device="meta")).sum(), [model[2]], [weight])
    # The last layer's weight gradient needs its input (4 x 16 fp32); the frozen layers before it keep nothing,
    # and the weight the layer saves for itself is not an activation.
    assert counts["activation_bytes"] == 4 * 16 * 4
    assert counts["recompute_flops"] == 2 * 4 * 16 * 16  # the checkpointing unit's forward
    assert counts["backward_flops"] == 2 * 4 * 16 * 16  # the weight gradient only


def _real_step_flops(recipe, accelerator_config) -> tuple[int, int]:
    from accelerate import Accelerator

    recipe.setup(Accelerator(mixed_precision="no", cpu=True), accelerator_config)
    generator = torch.Generator().manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        loss, _ = recipe.loss(generator)
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def test_blora_cost_on_meta_equals_the_flops_of_a_real_cpu_step(tiny_sdxl_pipe):
    from pipelines.blora import BLoRARecipe, BLoRASettings, default_train_config
    from pipelines.images import center_crop_square, load_image

    image = center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)
    recipe = BLoRARecipe(tiny_sdxl_pipe, image, BLoRASettings(token="[v1]", rank=4, resolution=64))
    forward, backward = _real_step_flops(recipe, default_train_config(steps=1, gradient_checkpointing=False))
    cost = blora_step_cost("tiny-sdxl", 64, rank=4, flash=False)
    assert (cost.forward_flops, cost.backward_flops) == (forward, backward)
    assert cost.trainable_params == sum(p.numel() for p in recipe.trainable_parameters())


def test_splitflux_cost_on_meta_equals_the_flops_of_a_real_cpu_step():
    from pipelines.images import center_crop_square, load_image
    from pipelines.models import load_pipeline
    from pipelines.splitflux import SplitFluxRecipe, SplitFluxSettings, default_train_config

    settings = SplitFluxSettings(token="[c1]", style_token="[s1]", rank=8, content_rank=6, resolution=64,
                                 max_sequence_length=32)
    image = center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)
    recipe = SplitFluxRecipe(load_pipeline("tiny-flux"), image, settings)
    forward, backward = _real_step_flops(recipe, default_train_config(steps=1, gradient_checkpointing=False))
    trainable = sum(p.numel() for p in recipe.trainable_parameters())
    recipe.remove_adapters()
    cost = splitflux_step_cost("tiny-flux", 64, settings=settings, text_length=32, flash=False)
    assert (cost.forward_flops, cost.backward_flops) == (forward, backward)
    assert cost.trainable_params == trainable


def test_checkpointing_trades_activation_memory_for_recomputed_forward_work():
    cost = blora_step_cost("tiny-sdxl", 64, rank=4)
    assert 0 < cost.checkpointed_activation_bytes < cost.activation_bytes
    assert 0 < cost.recompute_flops < cost.forward_flops
    assert cost.memory_bytes(True) < cost.memory_bytes(False)
    assert cost.details["checkpointing_units"] > 0


def test_floor_is_the_slower_of_compute_and_memory_and_a_fraction_compares_to_it():
    cost = StepCost("b-lora", "x", 64, forward_flops=6 * 10**12, backward_flops=4 * 10**12, recompute_flops=0,
                    frozen_params=0, trainable_params=0, weight_bytes=10**9, adapter_bytes=0, gradient_bytes=0,
                    optimizer_bytes=0, activation_bytes=0, checkpointed_activation_bytes=0, backward_weight_bytes=0)
    compute_bound = cost.floor(tflops=1000, bandwidth_gbs=1000)
    assert compute_bound["bound"] == "compute" and compute_bound["floor_s"] == pytest.approx(0.01)
    memory_bound = cost.floor(tflops=1000, bandwidth_gbs=10)
    assert memory_bound["bound"] == "memory" and memory_bound["floor_s"] == pytest.approx(0.1)
    assert fraction_of_floor(0.01, 0.04) == pytest.approx(0.25)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA GeForce RTX 3090", "RTX 3090"),
    ("NVIDIA H200 MIG 3g.71gb", None), ("NVIDIA RTX PRO 6000 Blackwell Server Edition", None),
])
def test_gpu_table_knows_the_common_cards_and_flags_the_rest(name, expected):
    spec = gpu_spec(name)
    assert (spec.name if spec else None) == expected
