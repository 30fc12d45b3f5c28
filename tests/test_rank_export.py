"""B-LoRA with a DyLoRA or SoRA adapter: one training, then ordinary packages at the ranks a user picks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.package import AdapterPackage
from pipelines.training import CancelToken, TrainingCancelled
from studio.cli import main
from tests.conftest import EXAMPLES, train_tiny


@pytest.fixture(scope="module")
def dylora_package(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("rank") / "cat-dy", steps=16, samples=False, adapter="dylora")


@pytest.fixture(scope="module")
def sora_package(tmp_path_factory):
    # A threshold of 0.3 with the official proximal step zeroes every gate under 0.6 at once: several die.
    import dataclasses

    from pipelines import blora

    original = blora.rank_adapter_config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blora, "rank_adapter_config",
                      lambda *args: dataclasses.replace(original(*args), threshold=0.3))
        return train_tiny(tmp_path_factory.mktemp("rank") / "cat-so", steps=6, samples=False, adapter="sora")


def _plain_diffusers_image(model_path, folder) -> tuple[np.ndarray, set[int]]:
    """What a user would write with diffusers alone: load the package folder, generate with a fixed seed."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(folder), adapter_name="blora")
    ranks = {module.r["blora"] for name, module in pipe.unet.named_modules() if hasattr(module, "r")
             and isinstance(getattr(module, "r", None), dict) and "blora" in module.r}
    image = pipe("A [v] cat", num_inference_steps=3, guidance_scale=5.0, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16), ranks


def test_dylora_package_records_the_adapter_and_keeps_its_trained_factors(dylora_package):
    info = json.loads((dylora_package / "adapter.json").read_text())
    adapter = info["adapter"]
    assert adapter["type"] == "dylora" and adapter["rank_range"] == [1, 4] and adapter["rank"] == 4
    assert info["rank"] == 4 and info["ranks"] == {"content": 4, "style": 4}
    assert info["files"]["dylora"] == "dylora.safetensors"
    full = AdapterPackage.open(dylora_package).state_dict("full")
    assert all(t.shape[0] == 4 for k, t in full.items() if k.endswith("lora_A.weight"))
    card = (dylora_package / "README.md").read_text()
    assert "DyLoRA over ranks 1-4" in card and "blockstudio export" in card


def test_dylora_blora_exports_at_two_ranks_that_plain_diffusers_loads(dylora_package, tiny_sdxl_path, tmp_path,
                                                                      capsys):
    images = {}
    for rank in (1, 3):
        out = tmp_path / f"cat-r{rank}"
        assert main(["export", str(dylora_package), "--rank", str(rank), "--out", str(out)]) == 0
        info = json.loads((out / "adapter.json").read_text())
        assert info["rank"] == rank and info["ranks"] == {"content": rank, "style": rank}
        assert info["adapter"]["type"] == "dylora" and info["adapter"]["rank"] == rank
        assert info["adapter"]["rank_range"] == [1, 4] and info["exported_from"] == "cat-dy"
        assert not (out / "dylora.safetensors").exists()  # an ordinary package, the size of its rank
        images[rank], loaded_ranks = _plain_diffusers_image(tiny_sdxl_path, out)
        assert loaded_ranks == {rank}
    assert np.abs(images[1] - images[3]).max() > 0


def test_export_cuts_the_first_ranks_with_alpha_over_rank_in_b(dylora_package, tmp_path):
    from safetensors.torch import load_file

    assert main(["export", str(dylora_package), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    trained = load_file(dylora_package / "dylora.safetensors")
    cut = AdapterPackage.open(tmp_path / "r2").state_dict("full")
    module = sorted(k[: -len(".lora_A")] for k in trained if k.endswith(".lora_A"))[0]
    torch.testing.assert_close(cut[f"{module}.lora_A.weight"], trained[f"{module}.lora_A"][:2])
    # alpha = r_max = 4, so the scale at rank 2 is 2.
    torch.testing.assert_close(cut[f"{module}.lora_B.weight"], 2.0 * trained[f"{module}.lora_B"][:, :2])


@pytest.mark.parametrize("rank", ["0", "5", "-1"])
def test_rank_outside_the_range_is_one_line_and_exit_2(dylora_package, tmp_path, capsys, rank):
    out = tmp_path / "bad"
    assert main(["export", str(dylora_package), "--rank", rank, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside the DyLoRA range [1, 4]" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_plain_lora_package_cannot_be_exported_at_another_rank(cat_package, tmp_path, capsys):
    assert main(["export", str(cat_package), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "plain LoRA package" in err and "--adapter dylora or sora" in err
    info = json.loads((cat_package / "adapter.json").read_text())
    assert "adapter" not in info and "dylora" not in info["files"]  # the default run is today's LoRA package


def test_export_replaces_nothing_without_force_and_never_its_source(dylora_package, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(dylora_package), "--rank", "2", "--out", str(out)]) == 2
    assert "choose a new name" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    cut = tmp_path / "cut"
    assert main(["export", str(dylora_package), "--rank", "2", "--out", str(cut)]) == 0
    assert main(["export", str(dylora_package), "--rank", "3", "--out", str(cut)]) == 2
    assert "--force" in capsys.readouterr().err
    assert json.loads((cut / "adapter.json").read_text())["rank"] == 2
    assert main(["export", str(dylora_package), "--rank", "3", "--out", str(cut), "--force"]) == 0
    assert json.loads((cut / "adapter.json").read_text())["rank"] == 3
    assert main(["export", str(dylora_package), "--rank", "3", "--out", str(dylora_package), "--force"]) == 2
    assert "is the package being exported" in capsys.readouterr().err
    assert (dylora_package / "dylora.safetensors").is_file()


def test_a_tampered_trained_file_is_refused(dylora_package, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(dylora_package, copy)
    state = load_file(copy / "dylora.safetensors")
    key = sorted(state)[0]
    state[key] = state[key][:2]
    save_file(state, copy / "dylora.safetensors")
    assert main(["export", str(copy), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "does not fit rank 4" in capsys.readouterr().err


def test_sora_package_is_pruned_and_exports_only_ranks_it_kept(sora_package, tmp_path, capsys):
    from safetensors.torch import load_file

    info = json.loads((sora_package / "adapter.json").read_text())
    adapter = info["adapter"]
    gates = {k: v for k, v in load_file(sora_package / "sora.safetensors").items() if k.endswith("lora_gate")}
    live = max(int(torch.count_nonzero(g)) for g in gates.values())
    assert adapter["type"] == "sora" and adapter["max_rank"] == 4 and adapter["rank_range"] == [1, live]
    assert sum(int(torch.count_nonzero(g)) for g in gates.values()) < 4 * len(gates)  # gates were pruned
    full = AdapterPackage.open(sora_package).state_dict("full")
    for key, gate in gates.items():
        module = key[: -len(".lora_gate")]
        if int(torch.count_nonzero(gate)):
            assert full[f"{module}.lora_A.weight"].shape[0] == int(torch.count_nonzero(gate))
    assert main(["export", str(sora_package), "--rank", str(live), "--out", str(tmp_path / "same")]) == 0
    same = AdapterPackage.open(tmp_path / "same").state_dict("full")
    assert set(same) == set(full) and all(torch.equal(same[k], full[k]) for k in full)
    assert main(["export", str(sora_package), "--rank", str(live + 1), "--out", str(tmp_path / "more")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"choose a rank up to {live}" in err


@pytest.mark.parametrize("adapter", ["dylora", "sora"])
def test_resume_after_cancel_equals_an_uninterrupted_run(adapter, tmp_path):
    from safetensors.torch import load_file

    from pipelines.blora import TrainRequest, train_blora

    straight = train_tiny(tmp_path / "straight", steps=8, samples=False, checkpoint_every=3, adapter=adapter)
    cancel = CancelToken()

    def stop_at_5(event):
        if event.step == 5:
            cancel.cancel()

    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "resumed", model="tiny-sdxl", steps=8, rank=4,
                           learning_rate=1e-3, checkpoint_every=3, samples=False, sample_steps=2, adapter=adapter)
    with pytest.raises(TrainingCancelled):
        train_blora(request, on_progress=stop_at_5, cancel=cancel)
    request.resume = True
    resumed = train_blora(request)
    a = load_file(straight / f"{adapter}.safetensors")
    b = load_file(resumed / f"{adapter}.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_rank_run_leaves_the_pipeline_bare_for_the_next_job(tiny_sdxl_pipe, tmp_path):
    from pipelines.adapters import AdapterLayer
    from pipelines.blora import TrainRequest, train_blora

    cancel = CancelToken()
    cancel.cancel()
    request = TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "stopped", model="tiny-sdxl", steps=4, rank=2,
                           samples=False, adapter="dylora")
    with pytest.raises(TrainingCancelled):
        train_blora(request, cancel=cancel, pipe=tiny_sdxl_pipe)
    assert not any(isinstance(m, AdapterLayer) for m in tiny_sdxl_pipe.unet.modules())


def test_unknown_adapter_is_refused_before_loading_a_model(tmp_path, capsys):
    from pipelines.blora import TrainRequest, prepare_request

    with pytest.raises(ValueError, match="adapter must be one of lora, dylora, sora"):
        prepare_request(TrainRequest(image=EXAMPLES / "cat.jpg", out=tmp_path / "x", model="tiny-sdxl",
                                     adapter="adalora"))
    rc = main(["train", "blora", "--image", str(EXAMPLES / "cat.jpg"), "--out", str(tmp_path / "y"),
               "--model", "tiny-sdxl", "--adapter", "sora", "--use-8bit-adam"])
    assert rc == 2 and "8-bit Adam" in capsys.readouterr().err
