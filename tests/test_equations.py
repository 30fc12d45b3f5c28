"""The equations of both recipes against their explicit formulas: values, not shapes.

SplitFlux's visual gate and complementary loss (pure functions), and B-LoRA's training step: its noisy input,
epsilon target and SDXL time ids, its LoRA config and initialisation, and the optimizer settings of both recipes.
SplitFlux's flow-matching step is checked in `test_splitflux.py`, beside the recipe fixtures it needs.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.adapters import complementary_loss, visual_gate
from tests.conftest import EXAMPLES

# -- SplitFlux: the visual gate and the complementary loss -------------------------------------------------


def test_visual_gate_is_the_sigmoid_of_token_norms_z_scored_with_each_images_biased_sigma():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 5, generator=generator) * torch.tensor([0.5, 1, 2, 3, 1, 4]).view(1, 6, 1)
    features[1] *= 7.0  # the second image has other statistics: the gate must use its own
    expected = torch.empty(2, 6, dtype=torch.float64)
    for b in range(2):
        norms = [math.sqrt(sum(float(v) ** 2 for v in token)) for token in features[b]]
        mu = sum(norms) / len(norms)
        sigma = math.sqrt(sum((n - mu) ** 2 for n in norms) / len(norms))  # biased: divided by N
        for n, norm in enumerate(norms):
            expected[b, n] = 1.0 / (1.0 + math.exp(-(norm - mu) / (sigma + 1e-6)))
    gate = visual_gate(features)
    torch.testing.assert_close(gate.double(), expected, rtol=1e-6, atol=1e-6)
    # The unbiased sigma (N - 1) gives a gate this test tells apart.
    norms = features.norm(dim=-1)
    unbiased = torch.sigmoid((norms - norms.mean(-1, keepdim=True)) / norms.std(-1, keepdim=True))
    assert (unbiased.double() - expected).abs().max() > 1e-3


def test_complementary_overlap_term_alone_gives_the_elementwise_absolute_sum():
    # Orthogonal down projections and orthogonal up projections: both direction terms vanish, so the loss is
    # the overlap sum |BA * DC| alone, here |[[1, 2], [3, 6]] * [[6, -3], [-2, 1]]| summed = 6+6+6+6 = 24.
    a, c = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, -1.0]])
    b, d = torch.tensor([[1.0], [3.0]]), torch.tensor([[3.0], [-1.0]])
    assert (a @ c.T).abs().sum() == 0 and (b.T @ d).abs().sum() == 0
    assert complementary_loss(a, b, c, d).item() == 24.0


def test_complementary_loss_adds_both_squared_direction_terms_to_the_overlap():
    # ||A C^T||^2 = 2^2 = 4, ||B^T D||^2 = 3^2 = 9, sum |BA * DC| = |1 * 6| = 6: 19 in all.
    a, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    b, d = torch.tensor([[1.0], [0.0]]), torch.tensor([[3.0], [0.0]])
    assert complementary_loss(a, b, c, d).item() == 19.0
    # Rank 2 against rank 1, every term non-zero: the same sum computed entry by entry.
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, generator=generator), torch.randn(4, 2, generator=generator)
    c, d = torch.randn(1, 3, generator=generator), torch.randn(4, 1, generator=generator)
    ac = sum(float(sum(a[i, k] * c[j, k] for k in range(3))) ** 2 for i in range(2) for j in range(1))
    bd = sum(float(sum(b[k, i] * d[k, j] for k in range(4))) ** 2 for i in range(2) for j in range(1))
    ba, dc = b @ a, d @ c
    overlap = sum(abs(float(ba[i, j] * dc[i, j])) for i in range(4) for j in range(3))
    assert complementary_loss(a, b, c, d).item() == pytest.approx(ac + bd + overlap, rel=1e-6)


# -- B-LoRA: the training step, the LoRA and the optimizer ------------------------------------------------

SDXL_BETAS = ("scaled_linear", 0.00085, 0.012, 1000)


def _blora_recipe(pipe, seed: int = 0, rank: int = 4):
    from accelerate import Accelerator

    from pipelines.blora import BLoRARecipe, BLoRASettings, default_train_config
    from pipelines.images import center_crop_square, load_image
    from pipelines.training import _allow_new_precision

    crop = center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)
    recipe = BLoRARecipe(pipe, crop, BLoRASettings(token="[v1]", rank=rank, resolution=64))
    _allow_new_precision("no")
    recipe.setup(Accelerator(mixed_precision="no", cpu=True), default_train_config(seed=seed))
    return recipe


def test_blora_step_adds_ddpm_noise_predicts_epsilon_and_sends_sdxl_time_ids(tiny_sdxl_pipe):
    recipe = _blora_recipe(tiny_sdxl_pipe)
    config = recipe.noise_scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps) == SDXL_BETAS
    assert config.prediction_type == "epsilon"
    prediction = torch.randn(recipe.latents.shape, generator=torch.Generator().manual_seed(9))
    seen = {}

    def unet(sample, timestep, *, encoder_hidden_states, added_cond_kwargs, return_dict):
        seen.update(sample=sample, timestep=timestep, text=encoder_hidden_states, added=added_cond_kwargs)
        return (prediction,)

    recipe.unet = unet
    loss, _ = recipe.loss(torch.Generator().manual_seed(4))
    # The same draws in the same order: latent sample, noise, timestep.
    generator = torch.Generator().manual_seed(4)
    x0 = recipe.latents.sample(generator).double()
    noise = torch.randn(x0.shape, generator=generator).double()
    t = int(torch.randint(0, 1000, (1,), generator=generator))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[t]
    assert seen["timestep"].tolist() == [t]
    torch.testing.assert_close(seen["sample"].double(), alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise,
                               rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(((prediction.double() - noise) ** 2).mean().item(), rel=1e-5)
    # SDXL's micro-conditioning: original size, crop top-left, target size, as the official script sends.
    assert seen["added"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]
    assert seen["added"]["text_embeds"] is recipe.pooled and seen["text"] is recipe.prompt_embeds


def _lora_downs(unet) -> torch.Tensor:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        assert layer.scaling["blora"] == 1.0
        assert not layer.lora_B["blora"].weight.any()  # up factors start at zero
    return torch.cat([layer.lora_A["blora"].weight.detach().flatten() for layer in layers])


def test_blora_lora_has_alpha_equal_to_rank_gaussian_init_and_the_runs_seed(tiny_sdxl_pipe):
    recipe = _blora_recipe(tiny_sdxl_pipe, seed=0, rank=4)
    config = tiny_sdxl_pipe.unet.peft_config["blora"]
    assert (config.r, config.lora_alpha, config.init_lora_weights, config.lora_dropout) == (4, 4, "gaussian", 0.0)
    downs = _lora_downs(tiny_sdxl_pipe.unet)
    assert downs.numel() > 5000
    assert downs.std().item() == pytest.approx(1 / 4, rel=0.05)  # N(0, 1/rank), as PEFT's gaussian init
    assert abs(downs.mean().item()) < 0.01
    recipe.remove_adapter()
    again = _blora_recipe(tiny_sdxl_pipe, seed=0, rank=4)
    assert torch.equal(_lora_downs(tiny_sdxl_pipe.unet), downs)
    again.remove_adapter()
    _blora_recipe(tiny_sdxl_pipe, seed=1, rank=4)
    assert not torch.equal(_lora_downs(tiny_sdxl_pipe.unet), downs)


def _group(optimizer) -> tuple:
    group = optimizer.param_groups[0]
    return type(optimizer), group["lr"], group["betas"], group["eps"], group["weight_decay"]


def test_optimizer_settings_of_both_recipes():
    from pipelines import blora, splitflux
    from pipelines.training import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    config = blora.default_train_config()
    assert (config.steps, config.max_grad_norm) == (1000, 1.0)
    # The official script's AdamW: lr 5e-5 (README), betas, eps and weight decay at the script's defaults.
    assert _group(make_optimizer(params, config, torch.device("cpu"))) == \
        (torch.optim.AdamW, 5e-5, (0.9, 0.999), 1e-8, 1e-4)
    # SplitFlux: the paper's Adam at 1e-4 with 32-bit state, also on a GPU unless 8-bit is asked for.
    config = splitflux.train_config(splitflux.SplitFluxRequest(image="unused.png", out="unused"))
    assert (config.steps, config.use_8bit_adam, config.max_grad_norm) == (1000, False, 1.0)
    optimizer = make_optimizer(params, config, torch.device("cuda"))
    assert _group(optimizer) == (torch.optim.AdamW, 1e-4, (0.9, 0.999), 1e-8, 0.0)
    opt_in = splitflux.train_config(splitflux.SplitFluxRequest(image="unused.png", out="unused", use_8bit_adam=True))
    assert opt_in.use_8bit_adam is True
    # AdamW without weight decay takes exactly Adam's step.
    adam_params = [torch.nn.Parameter(torch.ones(3))]
    adam = torch.optim.Adam(adam_params, lr=1e-4)
    for p, opt in ((params[0], optimizer), (adam_params[0], adam)):
        p.grad = torch.tensor([0.5, -1.0, 2.0])
        opt.step()
    assert torch.equal(params[0], adam_params[0])
