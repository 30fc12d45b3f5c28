"""Merging style packages and signing packages: the arithmetic, packages that plain diffusers loads, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipelines import formats
from pipelines.merge import (
    MergeError,
    MergeOptions,
    low_rank,
    masked_delta,
    merge_packages,
    merge_states,
    parse_weights,
)
from pipelines.package import AdapterPackage
from pipelines.watermark import (
    DETECT,
    WatermarkError,
    mark_package,
    mark_state,
    read_state,
    unmark_state,
    verify_package,
)
from studio.cli import main


def _deltas(state):
    return {m: b.float() @ a.float() for m, (a, b) in formats.lora_modules(state).items()}


def _random_state(seed, modules=("blocks.0.to_q", "blocks.0.to_v"), rank=3, width=64):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module in modules:
        state[f"{module}.lora_A.weight"] = torch.randn(rank, width, generator=generator) / 8
        state[f"{module}.lora_B.weight"] = torch.randn(width, rank, generator=generator) / 8
    return state


@pytest.fixture()
def packages(cat_package, coffee_package, tmp_path):
    """Copies of the two trained tiny-sdxl packages (tests may change them)."""
    return [shutil.copytree(p, tmp_path / p.name) for p in (cat_package, coffee_package)]


# -- merging: the arithmetic ------------------------------------------------------------------------------


def test_masked_delta_adds_each_style_on_its_own_tall_mask():
    generator = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 6, 5, generator=generator)
    merged, kept = masked_delta(deltas, 0.6)
    masks = deltas.abs() > 0.6 * (deltas.sum(0) - deltas).abs()
    torch.testing.assert_close(merged, (deltas * masks).sum(0))
    assert kept == pytest.approx(float(masks.float().mean())) and 0 < kept < 1
    # Two styles: a style that dominates an entry keeps it alone, the weaker one's share is left out.
    pair = torch.tensor([[[1.0, 1.0]], [[0.1, 0.9]]])
    merged, _ = masked_delta(pair, 0.6)
    torch.testing.assert_close(merged, torch.tensor([[1.0, 1.9]]))


def test_truncated_svd_is_the_best_low_rank_factoring():
    delta = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    down, up, energy = low_rank(delta, 2)
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(up @ down, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])
    assert energy == pytest.approx(float((s[:2] ** 2).sum() / (s**2).sum()))
    exact_down, exact_up, whole = low_rank(delta, 6)
    torch.testing.assert_close(exact_up @ exact_down, delta, atol=1e-5, rtol=1e-5)
    assert whole == pytest.approx(1.0)


def test_a_plain_sum_is_exact_and_weighted():
    states = [_random_state(1), _random_state(2)]
    result = merge_states(states, MergeOptions(mode="sum", weights=(1.0, 0.5)))
    merged, first, second = _deltas(result.state), _deltas(states[0]), _deltas(states[1])
    for module in merged:
        torch.testing.assert_close(merged[module], first[module] + 0.5 * second[module])
        assert result.modules[module].rank == 6 and result.modules[module].energy_kept == 1.0


def test_masked_merge_is_the_masked_sum_factored_back():
    states = [_random_state(1), _random_state(2)]
    result = merge_states(states, MergeOptions(mode="masked", mask_lambda=0.6))
    first, second = _deltas(states[0]), _deltas(states[1])
    for module, delta in _deltas(result.state).items():
        expected, _ = masked_delta(torch.stack([first[module], second[module]]), 0.6)
        down, up, _ = low_rank(expected, 6)
        torch.testing.assert_close(delta, up @ down, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, message", [
    (MergeOptions(mode="average"), "merge mode"),
    (MergeOptions(mask_lambda=float("nan")), "mask lambda"),
    (MergeOptions(weights=(1.0,)), "one weight per package"),
    (MergeOptions(weights=(1.0, float("inf"))), "weight"),
    (MergeOptions(rank=0), "rank"),
])
def test_bad_merge_options_are_one_line(options, message):
    with pytest.raises(MergeError, match=message):
        options.checked(2)


def test_weights_are_read_from_text_and_bad_text_is_one_line():
    assert parse_weights(" 1, 0.5;2 ") == (1.0, 0.5, 2.0)
    assert parse_weights("") is None and parse_weights(None) is None
    with pytest.raises(MergeError, match="^weights must be numbers separated by commas"):
        parse_weights("1, half")


# -- merging packages -----------------------------------------------------------------------------------------


def test_merging_two_style_packages_gives_a_package_plain_diffusers_loads(packages, tmp_path, tiny_sdxl_pipe):
    cat, coffee = (AdapterPackage.open(p) for p in packages)
    path = merge_packages([cat, coffee], tmp_path / "blend", "blend")
    merged = AdapterPackage.open(path)
    assert merged.parts() == ["full", "style"] and merged.part_for("style") == "style"
    assert merged.info["merge"]["mode"] == "masked" and [s["name"] for s in merged.info["merge"]["sources"]] == \
        ["cat", "coffee"]
    state = merged.state_dict("style")
    merged_deltas = _deltas(state)
    for source in (cat, coffee):
        own = _deltas(source.state_dict("style"))
        assert set(own) == set(merged_deltas)
        assert any(not torch.allclose(merged_deltas[m], own[m], atol=1e-4) for m in own)
    pipe = tiny_sdxl_pipe
    pipe.load_lora_weights(str(path), adapter_name="blend")
    for module, delta in merged_deltas.items():
        torch.testing.assert_close(pipe.unet.get_submodule(module).get_delta_weight("blend"), delta, atol=1e-5,
                                   rtol=1e-4)
    pipe.load_lora_weights(str(path / "kohya"), weight_name="blend.safetensors", adapter_name="blend-kohya")


def test_a_merged_package_s_card_loads_its_style_and_keeps_doing_so_when_signed(packages, tmp_path):
    cat, coffee = (AdapterPackage.open(p) for p in packages)
    path = merge_packages([cat, coffee], tmp_path / "blend", "blend")
    signed = mark_package(path, "101", out=tmp_path / "blend-signed")
    for folder, name in ((path, "blend"), (signed, "blend-signed")):
        card = (folder / "README.md").read_text()
        assert f'pipe.load_lora_weights("{name}", weight_name="style.safetensors"' in card
        assert "`cat`, `coffee`" in card and "TALL mask" in card and "mix.safetensors" not in card
        assert f"kohya/{name}_style.safetensors" in card and (folder / "kohya" / f"{name}_style.safetensors").is_file()


def test_packages_of_different_base_models_or_methods_are_refused(packages, tmp_path):
    info_path = packages[1] / "adapter.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "base_model": "sdxl"}))
    opened = [AdapterPackage.open(p) for p in packages]
    with pytest.raises(MergeError, match=r"different base models \(sdxl, tiny-sdxl\)"):
        merge_packages(opened, tmp_path / "out", "out")
    info_path.write_text(json.dumps({**info, "method": "splitflux"}))
    opened = [AdapterPackage.open(p) for p in packages]
    with pytest.raises(MergeError, match="different methods"):
        merge_packages(opened, tmp_path / "out", "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="at least two"):
        merge_packages(opened[:1], tmp_path / "out", "out")


def test_cli_merges_and_refuses_mixed_base_models_in_one_line(packages, tmp_path, capsys):
    out = tmp_path / "blend"
    assert main(["merge", str(packages[0]), str(packages[1]), "--out", str(out), "--mode", "sum"]) == 0
    assert AdapterPackage.open(out).info["merge"]["mode"] == "sum"
    assert "merged 2 styles (sum)" in capsys.readouterr().out
    info_path = packages[1] / "adapter.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "base_model": "sdxl"}))
    assert main(["merge", str(packages[0]), str(packages[1]), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "different base models" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()
    assert main(["merge", str(packages[0]), str(packages[1]), "--out", str(tmp_path / "other"), "--weights", "1,x"]) == 2
    assert capsys.readouterr().err.strip().endswith("weights must be numbers separated by commas, e.g. 1, 0.5")


# -- signatures: the arithmetic ---------------------------------------------------------------------------------


def test_a_marked_state_reads_its_bits_and_an_unmarked_or_other_key_reads_none():
    state = _random_state(3, modules=tuple(f"blocks.{i}.to_q" for i in range(4)))
    bits = [1, 0, 0, 1, 1, 0]
    marked = mark_state(state, bits, key="owner", strength=10.0)
    reading = read_state(marked, key="owner")
    assert reading.bits(len(bits)) == bits and reading.bits() == bits
    assert all(abs(abs(z) - 10.0) < 3.0 for z in reading.z[: len(bits)])
    assert read_state(state, key="owner").bits() == []
    assert all(abs(z) < DETECT for z in read_state(marked, key="thief").z)


def test_swapping_branches_changes_only_the_bits_and_unmarking_gives_the_factors_back():
    state = _random_state(4, modules=tuple(f"blocks.{i}.to_q" for i in range(4)))
    marked = mark_state(state, [1, 1, 0], key="k")
    swapped = mark_state(unmark_state(marked, 3, key="k"), [0, 1, 1], key="k")
    assert read_state(swapped, key="k").bits(3) == [0, 1, 1]
    restored = unmark_state(swapped, 3, key="k")
    for key, value in state.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=1e-6)
    # The branches sit among the style's factors: no row of the marked A is a probe by itself.
    original, signed = _deltas(state), _deltas(marked)
    for module in original:
        assert float((signed[module] - original[module]).norm() / original[module].norm()) < 0.5


# -- signing packages ---------------------------------------------------------------------------------------


def test_signed_package_verifies_and_still_loads_in_plain_diffusers(packages, tmp_path, tiny_sdxl_pipe):
    signed = mark_package(packages[0], "1011001", key="owner", out=tmp_path / "cat-signed")
    result = verify_package(signed, key="owner")
    assert result.text == "1011001" and result.bits == [1, 0, 1, 1, 0, 0, 1]
    assert verify_package(signed, key="owner", part="style").text == "1011001"
    info = AdapterPackage.open(signed).info
    assert info["name"] == "cat-signed" and info["watermark"]["bits"] == 7 and "signature" not in info["watermark"]
    _, metadata = formats.read_safetensors(signed / "pytorch_lora_weights.safetensors")
    assert json.loads(metadata["blockstudio.watermark"])["bits"] == 7
    pipe = tiny_sdxl_pipe
    pipe.load_lora_weights(str(signed), adapter_name="signed")
    pipe.load_lora_weights(str(signed / "kohya"), weight_name="cat-signed.safetensors", adapter_name="kohya")
    for module, delta in _deltas(AdapterPackage.open(signed).state_dict("full")).items():
        for adapter in ("signed", "kohya"):
            torch.testing.assert_close(pipe.unet.get_submodule(module).get_delta_weight(adapter), delta, atol=1e-5,
                                       rtol=1e-4)


def test_an_unsigned_package_says_it_carries_no_signature(packages):
    with pytest.raises(WatermarkError, match=r"^package cat carries no MarkBoard signature$"):
        verify_package(packages[0])


def test_a_hot_swap_of_the_branches_is_read_back(packages):
    mark_package(packages[0], "1100", key="k")
    assert verify_package(packages[0], key="k").text == "1100"
    before = AdapterPackage.open(packages[0]).state_dict("full")
    mark_package(packages[0], "0110", key="k")
    assert verify_package(packages[0], key="k").text == "0110"
    after = AdapterPackage.open(packages[0]).state_dict("full")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    with pytest.raises(WatermarkError, match="recorded as signed, but no signature reads with this key"):
        verify_package(packages[0], key="someone else")


def test_a_signature_longer_than_the_branches_hold_is_refused_and_the_package_untouched(packages):
    before = {p.name: p.read_bytes() for p in packages[0].rglob("*.safetensors")}
    with pytest.raises(WatermarkError, match="the signature has 65 bits but package cat .*can hold at most 64"):
        mark_package(packages[0], "1" * 65)
    assert {p.name: p.read_bytes() for p in packages[0].rglob("*.safetensors")} == before
    with pytest.raises(WatermarkError, match="string of 0 and 1"):
        mark_package(packages[0], "10x1")


def test_a_package_with_trained_factors_is_signed_only_as_a_copy_at_its_rank(packages, tmp_path):
    """A DyLoRA package exports other ranks from its trained factors; those exports would carry no signature."""
    info_path = packages[0] / "adapter.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()),
                                     "adapter": {"type": "dylora", "rank_range": [1, 4], "rank": 4}}))
    (packages[0] / "dylora.safetensors").write_bytes(b"factors")
    before = {p.relative_to(packages[0]): p.read_bytes() for p in packages[0].rglob("*") if p.is_file()}
    with pytest.raises(WatermarkError, match=r"keeps its trained factors \(dylora.safetensors\).*sign a copy"):
        mark_package(packages[0], "101")
    assert {p.relative_to(packages[0]): p.read_bytes() for p in packages[0].rglob("*") if p.is_file()} == before
    signed = mark_package(packages[0], "101", out=tmp_path / "cat-signed")
    assert verify_package(signed).text == "101"
    assert not (signed / "dylora.safetensors").exists() and (packages[0] / "dylora.safetensors").exists()


def test_cli_signs_verifies_and_says_in_one_line_when_there_is_no_signature(packages, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("BLOCKSTUDIO_WATERMARK_KEY", "from-the-environment")
    out = tmp_path / "signed"
    assert main(["watermark", "embed", str(packages[0]), "--signature", "101", "--out", str(out)]) == 0
    assert main(["watermark", "verify", str(out)]) == 0
    assert "signature 101 (3 bits" in capsys.readouterr().out
    assert main(["watermark", "verify", str(out), "--key", "wrong"]) == 2
    assert main(["watermark", "verify", str(packages[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no signature reads with this key" in err[0]
    assert err[1] == "blockstudio: error: package coffee carries no MarkBoard signature readable with this key"
