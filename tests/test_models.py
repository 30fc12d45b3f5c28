"""The model registry and the tiny models built from configs."""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import ModelNotAvailable
from pipelines.models import REGISTRY, resolve_model
from pipelines.tiny import tiny_sdxl_components


def test_tiny_sdxl_build_is_deterministic():
    a = tiny_sdxl_components(seed=0)["unet"].state_dict()
    b = tiny_sdxl_components(seed=0)["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_sdxl_keeps_sdxl_block_topology(tiny_sdxl_pipe):
    unet = tiny_sdxl_pipe.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert len(unet.up_blocks[0].attentions) == 3
    assert unet.config.addition_embed_type == "text_time"
    assert type(tiny_sdxl_pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_tiny_tokenizer_handles_any_text(tiny_sdxl_pipe):
    ids = tiny_sdxl_pipe.tokenizer("A [v18] in [v30] style — ünïcode").input_ids
    assert ids[0] == tiny_sdxl_pipe.tokenizer.bos_token_id and ids[-1] == tiny_sdxl_pipe.tokenizer.eos_token_id
    assert tiny_sdxl_pipe.tokenizer("[v18]").input_ids != tiny_sdxl_pipe.tokenizer("[v30]").input_ids


def test_registry_names_and_hub_ids():
    assert REGISTRY["sdxl"].repo_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert resolve_model("someone/my-sdxl-finetune").arch == "sdxl"
    assert resolve_model("tiny-sdxl").tiny


def test_local_folder_resolves_by_its_pipeline_class(tiny_sdxl_path):
    spec = resolve_model(str(tiny_sdxl_path))
    assert spec.arch == "sdxl" and spec.repo_id is None


def test_unknown_model_and_bad_folder_are_refused(tmp_path):
    with pytest.raises(ModelNotAvailable, match="unknown model"):
        resolve_model("no-such-model")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ModelNotAvailable, match="not supported"):
        resolve_model(str(tmp_path))
