"""Speed and memory levers: each can be switched, and a short CPU run's losses stay what they were.

Tolerances, relative, on the losses of a 2-step run (the second after one optimizer step) against the CPU
defaults (every lever off, fp32, SDPA): exact for gradient checkpointing (it recomputes the same operations)
and TF32 (no CPU kernel uses it); 1e-4 for the math attention kernel (SDPA's default on a CPU is its flash kernel) and for channels-last (other convolution
kernels); 1e-5 for fused AdamW and compiled blocks (the same arithmetic, reordered); 5e-2 for bf16 mixed
precision and 2e-1 for an fp8 base, which change the numbers on purpose. 8-bit AdamW, the NF4 base, xformers
and inductor compilation need CUDA: `tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EXAMPLES

STEPS = 2


def _image():
    from pipelines.images import center_crop_square, load_image

    return center_crop_square(load_image(EXAMPLES / "cat.jpg"), 64)


def blora_recipe(**settings):
    from pipelines.blora import BLoRARecipe, BLoRASettings, default_train_config
    from pipelines.models import load_pipeline

    recipe = BLoRARecipe(load_pipeline("tiny-sdxl"), _image(), BLoRASettings(token="[v1]", rank=4, resolution=64))
    return recipe, default_train_config


def splitflux_recipe(**settings):
    from pipelines.models import load_pipeline
    from pipelines.splitflux import SplitFluxRecipe, SplitFluxSettings, default_train_config

    settings = SplitFluxSettings(token="[c1]", style_token="[s1]", rank=8, content_rank=6, resolution=64,
                                 max_sequence_length=32, **settings)
    return SplitFluxRecipe(load_pipeline("tiny-flux"), _image(), settings), default_train_config


RECIPES = {"b-lora": blora_recipe, "splitflux": splitflux_recipe}


def losses(kind: str, tmp_path, settings: dict | None = None, **levers) -> list[float]:
    from pipelines.training import train

    recipe, default_config = RECIPES[kind](**(settings or {}))
    config = default_config(steps=STEPS, learning_rate=1e-3, checkpoint_every=0, **levers)
    return train(recipe, config, tmp_path / f"{kind}-{len(list(tmp_path.iterdir()))}").loss_history


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline")
    return {kind: losses(kind, folder) for kind in RECIPES}


CASES = [
    ("gradient_checkpointing", True, 0.0),
    ("tf32", True, 0.0),
    ("attention", "math", 1e-4),
    ("fused_adam", True, 1e-5),
    ("channels_last", True, 1e-4),
    ("mixed_precision", "bf16", 5e-2),
]


@pytest.mark.parametrize("kind", list(RECIPES))
@pytest.mark.parametrize("lever, value, tolerance", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_each_lever_leaves_the_losses_of_a_short_run_unchanged(kind, lever, value, tolerance, baseline, tmp_path):
    switched = losses(kind, tmp_path, **{lever: value})
    assert len(switched) == STEPS
    assert switched == pytest.approx(baseline[kind], rel=tolerance, abs=0 if tolerance else 1e-12)


@pytest.mark.parametrize("kind", list(RECIPES))
def test_compiled_blocks_give_the_same_losses_and_are_compiled(kind, baseline, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    switched = losses(kind, tmp_path, compile_blocks=True, compile_backend="aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert switched == pytest.approx(baseline[kind], rel=1e-5)


def test_fp8_base_stays_close(baseline, tmp_path):
    switched = losses("splitflux", tmp_path, settings={"quantize_base": "fp8"})
    assert switched == pytest.approx(baseline["splitflux"], rel=2e-1)
    assert switched != baseline["splitflux"]  # fp8 storage really changed the weights used


def test_levers_resolve_to_the_gpu_defaults_on_cuda_and_off_on_a_cpu():
    from pipelines.training import TrainConfig, resolve_levers

    cpu = resolve_levers(TrainConfig(), torch.device("cpu"))
    assert cpu == {"mixed_precision": "no", "attention": "sdpa", "gradient_checkpointing": None,
                   "compile_blocks": False, "fused_adam": False, "tf32": False, "channels_last": False,
                   "use_8bit_adam": False}
    asked = resolve_levers(TrainConfig(compile_blocks=True, attention="math", gradient_checkpointing=True),
                           torch.device("cpu"))
    assert asked["compile_blocks"] and asked["attention"] == "math" and asked["gradient_checkpointing"]
    with pytest.raises(ValueError, match="efficient needs a CUDA GPU"):
        resolve_levers(TrainConfig(attention="efficient"), torch.device("cpu"))
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_levers(TrainConfig(attention="fast"), torch.device("cpu"))


def test_checkpointing_is_chosen_from_the_memory_estimate_on_a_gpu(monkeypatch):
    from pipelines import training

    class Props:
        total_memory = 24 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    cuda = torch.device("cuda")
    assert training.gradient_checkpointing_for(None, cuda, lambda: 30 * 2**30) is True
    assert training.gradient_checkpointing_for(None, cuda, lambda: 8 * 2**30) is False
    assert training.gradient_checkpointing_for(False, cuda, lambda: 30 * 2**30) is False
    assert training.gradient_checkpointing_for(None, torch.device("cpu"), lambda: 10**15) is False


def _saved_in(modules, run) -> int:
    """How many tensors autograd keeps for backward while any of `modules` runs."""
    inside = [0]
    saved = [0]
    handles = [m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1)) for m in modules]
    handles += [m.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1)) for m in modules]

    def pack(tensor):
        if inside[0]:
            saved[0] += 1
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run()
    finally:
        for handle in handles:
            handle.remove()
    assert loss.requires_grad
    return saved[0]


def test_no_autograd_graph_where_no_gradient_flows():
    from accelerate import Accelerator

    from pipelines.blora import default_train_config

    generator = torch.Generator().manual_seed(0)
    config = default_train_config(steps=1, gradient_checkpointing=False)
    blora, _ = blora_recipe()
    blora.setup(Accelerator(mixed_precision="no", cpu=True), config)
    unet = blora.unet
    assert _saved_in([*unet.down_blocks, unet.mid_block], lambda: blora.loss(generator)[0]) == 0
    assert _saved_in(unet.up_blocks, lambda: blora.loss(generator)[0]) > 0

    flux, _ = splitflux_recipe()
    flux.setup(Accelerator(mixed_precision="no", cpu=True), config)
    t = flux.transformer
    assert _saved_in(list(t.transformer_blocks), lambda: flux.loss(generator)[0]) == 0
    assert _saved_in(list(t.single_transformer_blocks), lambda: flux.loss(generator)[0]) > 0


def test_cli_sets_every_lever(tmp_path):
    from studio.cli import _run_request_fields, build_parser

    args = build_parser().parse_args([
        "train", "blora", "--image", "x.png", "--out", str(tmp_path / "p"), "--attention", "math",
        "--compile-blocks", "--no-fused-adam", "--tf32", "--no-channels-last", "--gradient-checkpointing",
    ])
    fields = _run_request_fields(args)
    assert {k: fields[k] for k in ("attention", "compile_blocks", "fused_adam", "tf32", "channels_last",
                                   "gradient_checkpointing")} == {
        "attention": "math", "compile_blocks": True, "fused_adam": False, "tf32": True, "channels_last": False,
        "gradient_checkpointing": True}


@pytest.mark.parametrize("field, value, message", [
    ("attention", "fast", "attention must be one of"),
    ("compile_blocks", "yes", "compile blocks must be on, off or unset"),
    ("tf32", 1, "tf32 must be on, off or unset"),
    ("max_steps_this_call", 0, "steps per call"),
    ("max_steps_this_call", True, "steps per call"),
    ("mixed_precision", "fp8", "mixed precision must be"),
])
def test_bad_lever_values_are_refused_before_a_model_loads(field, value, message, tmp_path, monkeypatch):
    import pipelines.generation  # noqa: F401 - imported first, so that it keeps the real load_pipeline
    from pipelines import models
    from pipelines.blora import TrainRequest, train_blora

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "p", model="tiny-sdxl", **{field: value})
    with pytest.raises(ValueError, match=message):
        train_blora(request)
    assert not (tmp_path / "p").exists()
