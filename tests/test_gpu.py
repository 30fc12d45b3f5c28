"""The CUDA paths: mixed precision, 8-bit AdamW, quantized bases, xformers, compilation, resume and hotswap.

Marked `gpu` and skipped without CUDA. On a GPU machine: `pytest -m gpu tests/test_gpu.py` (the tiny models, so
each test takes seconds; the full-size speed and memory figures come from `bench/`).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import EXAMPLES, train_tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on one)"),
]

# cuBLAS picks the same kernels run after run only with a fixed workspace (needed by the resume test).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _image():
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)


def run(kind: str, tmp_path, steps: int = 3, settings: dict | None = None, **levers):
    """Train a tiny recipe on the GPU; return (losses, recipe, the optimizer it used)."""
    from pipelines import blora, training
    from tests.test_levers import RECIPES

    recipe, default_config = RECIPES[kind](**(settings or {}))
    config = default_config(steps=steps, learning_rate=1e-3, checkpoint_every=0, **levers)
    made = []
    original = training.make_optimizer

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    # The loop's optimizer, whether the loop builds it or the recipe does through the loop's function.
    training.make_optimizer = blora.make_optimizer = spy
    try:
        result = training.train(recipe, config, tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}")
    finally:
        training.make_optimizer = blora.make_optimizer = original
    return result.loss_history, recipe, made[0]


KINDS = ["b-lora", "splitflux"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_adapters_on_a_frozen_half_precision_base(kind, precision, tmp_path):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    losses, recipe, _ = run(kind, tmp_path, mixed_precision=precision, use_8bit_adam=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    trainable = recipe.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainable)
    frozen = {p.dtype for p in recipe.trainable_module().parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float16}


@pytest.mark.parametrize("kind", KINDS)
def test_8bit_adamw_trains(kind, tmp_path):
    pytest.importorskip("bitsandbytes")
    losses, _, optimizer = run(kind, tmp_path, use_8bit_adam=True)
    assert type(optimizer).__name__ == "AdamW8bit"
    assert all(torch.isfinite(torch.tensor(losses)))


def test_fused_adamw_is_the_gpu_default(tmp_path):
    _, _, optimizer = run("b-lora", tmp_path, steps=1, use_8bit_adam=False)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


@pytest.mark.parametrize("base", ["fp8", "nf4"])
def test_quantized_flux_base_trains_and_writes_a_package(base, tmp_path):
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    from pipelines.package import AdapterPackage
    from pipelines.splitflux import SplitFluxRequest, train_splitflux

    out = train_splitflux(SplitFluxRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / base, model="tiny-flux",
                                           steps=3, rank=8, content_rank=6, learning_rate=1e-3,
                                           quantize_base=base, sample_steps=1))
    weights = AdapterPackage.open(out).state_dict("full")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("kind", KINDS)
def test_xformers_attention_gives_the_sdpa_losses(kind, tmp_path):
    pytest.importorskip("xformers")
    sdpa, _, _ = run(kind, tmp_path, attention="sdpa", mixed_precision="bf16")
    xformers, _, _ = run(kind, tmp_path, attention="xformers", mixed_precision="bf16")
    assert xformers == pytest.approx(sdpa, rel=2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_blocks_give_the_eager_losses(kind, tmp_path):
    eager, _, _ = run(kind, tmp_path, compile_blocks=False, mixed_precision="bf16")
    compiled, recipe, _ = run(kind, tmp_path, compile_blocks=True, mixed_precision="bf16")
    assert compiled == pytest.approx(eager, rel=2e-2)
    # Regional compilation is undone after training: the pipeline generates eagerly again.
    assert not any(getattr(m, "_compiled_call_impl", None) for m in recipe.trainable_module().modules())


@pytest.mark.parametrize("method", ["blora", "splitflux"])
def test_resume_on_cuda_is_bit_identical_to_an_uninterrupted_run(method, tmp_path):
    from pipelines.package import AdapterPackage
    from pipelines.training import CancelToken, TrainingCancelled

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        if method == "blora":
            from pipelines.blora import TrainRequest as Request
            from pipelines.blora import train_blora as train_fn

            options = dict(model="tiny-sdxl", rank=4)
        else:
            from pipelines.splitflux import SplitFluxRequest as Request
            from pipelines.splitflux import train_splitflux as train_fn

            options = dict(model="tiny-flux", rank=8, content_rank=6)
        common = dict(image=EXAMPLES / "cat.jpg", steps=6, learning_rate=1e-3, checkpoint_every=2, samples=False,
                      **options)
        straight = train_fn(Request(out=tmp_path / "straight", **common))
        cancel = CancelToken()

        def stop_at_3(event):
            if event.step == 3:
                cancel.cancel()

        request = Request(out=tmp_path / "resumed", **common)
        with pytest.raises(TrainingCancelled):
            train_fn(request, on_progress=stop_at_3, cancel=cancel)
        request.resume = True
        resumed = train_fn(request)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = AdapterPackage.open(straight).state_dict("full"), AdapterPackage.open(resumed).state_dict("full")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_hotswapping_a_compiled_pipeline_does_not_recompile(tmp_path):
    import torch._dynamo

    from pipelines.generation import AdapterChoice, StudioPipeline
    from pipelines.package import AdapterPackage

    first = AdapterPackage.open(train_tiny(tmp_path / "cat", "cat.jpg", steps=2, samples=False))
    second = AdapterPackage.open(train_tiny(tmp_path / "coffee", "coffee.jpg", steps=2, samples=False,
                                            token="[v7]"))
    torch._dynamo.reset()
    studio = StudioPipeline("tiny-sdxl", device="cuda", hotswap_rank=8)
    studio.set_adapters(content=AdapterChoice(first, "content", 1.0))
    studio.pipe.unet.compile()
    studio.generate("A [c]", content=AdapterChoice(first, "content", 1.0), steps=2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        studio.generate("A [c]", content=AdapterChoice(second, "content", 1.0), steps=2)
    assert studio.hotswaps == 1
