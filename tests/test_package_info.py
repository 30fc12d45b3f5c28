"""adapter.json as a typed, versioned record: packages written before format 2 still read, a newer format and
values of the wrong type are refused in one line, and what a recipe records of its own is kept."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.errors import InvalidAdapter
from pipelines.package_info import PACKAGE_FORMAT_VERSION, PackageInfo

# adapter.json of a B-LoRA package as format 1 wrote it: blocks and ranks, no parts, no composition, no version.
FORMAT_1_BLORA = {
    "method": "b-lora", "arch": "sdxl", "base_model": "tiny-sdxl", "name": "cat", "token": "[v42]",
    "prompt": "A [v42]", "rank": 4, "steps": 30, "learning_rate": 0.001, "seed": 0, "resolution": 64,
    "blocks": {"content": "up_blocks.0.attentions.0", "style": "up_blocks.0.attentions.1"},
    "ranks": {"content": 4, "style": 4},
    "files": {"full": "pytorch_lora_weights.safetensors", "content": "content.safetensors",
              "style": "style.safetensors", "kohya": "kohya/cat.safetensors", "samples": ["samples/full.png"]},
    "sample_prompts": {"full": "A [v42]"},
}


def test_a_format_1_record_reads_with_its_parts_and_the_composition_it_was_used_with():
    info = PackageInfo.from_dict(FORMAT_1_BLORA)
    assert info.format_version == 1
    assert {name: (part.blocks, part.rank) for name, part in info.parts.items()} == {
        "content": ("up_blocks.0.attentions.0", 4), "style": ("up_blocks.0.attentions.1", 4)}
    assert info.composition is None and not info.used_composition().recorded
    assert (info.part_for("mix"), info.part_for("style")) == ("content", "style")
    written = info.to_dict()
    assert written["format_version"] == PACKAGE_FORMAT_VERSION and "composition" not in written
    assert written["parts"]["style"] == {"blocks": "up_blocks.0.attentions.1", "rank": 4}
    assert PackageInfo.from_dict(written).to_dict() == written


def test_a_recipes_own_facts_are_kept_as_they_were():
    record = {**FORMAT_1_BLORA, "gate": {"source": "block_input", "text": 1.0}, "paper_silent": {"x": 1}}
    info = PackageInfo.from_dict(record)
    assert info.extra == {"gate": {"source": "block_input", "text": 1.0}, "paper_silent": {"x": 1}}
    assert info.to_dict()["gate"] == record["gate"]


def test_a_newer_format_is_refused_in_one_line():
    with pytest.raises(InvalidAdapter, match=r"format 3, newer than this Block Studio reads") as refused:
        PackageInfo.from_dict({**FORMAT_1_BLORA, "format_version": PACKAGE_FORMAT_VERSION + 1})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"rank": "64"}, "rank must be a number"),
    ({"rank": True}, "rank must be a number"),
    ({"token": 7}, "token must be text"),
    ({"format_version": 0}, "format_version must be a whole number"),
    ({"ranks": {"content": 4.5}}, "ranks must be an object of numbers"),
    ({"parts": {"content": {"rank": False}}}, "parts.content.rank must be a whole number"),
    ({"parts": {"content": {"branches": {"a": "x"}}}}, "parts.content.branches must be branch names with numbers"),
    ({"files": {"full": 3}}, "files must be an object of file names"),
])
def test_a_value_of_the_wrong_type_names_its_key(change, message):
    with pytest.raises(InvalidAdapter, match=f"^adapter.json: {message}"):
        PackageInfo.from_dict({**FORMAT_1_BLORA, **change})


def test_a_package_written_in_format_1_opens_with_the_same_parts_and_uses(cat_package, tmp_path):
    """A package of today rewritten in format 1 (no parts, no composition, no version) loads the same parts."""
    from pipelines.package import AdapterPackage

    old = tmp_path / "old"
    shutil.copytree(cat_package, old)
    record = json.loads((old / "adapter.json").read_text())
    for key in ("parts", "composition", "format_version"):
        record.pop(key, None)
    (old / "adapter.json").write_text(json.dumps(record))
    package, today = AdapterPackage.open(old), AdapterPackage.open(cat_package)
    assert package.meta.format_version == 1 and not package.meta.used_composition().recorded
    assert package.parts() == today.parts()
    for use in ("mix", "content", "reembed", "style"):
        assert package.part_for(use) == today.part_for(use)
    assert package.meta.parts["content"].blocks == today.meta.parts["content"].blocks
    assert "older package" in package.composition_line()
