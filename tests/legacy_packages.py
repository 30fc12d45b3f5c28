"""Packages in layouts Block Studio wrote before, made from a package of today, for tests that they still work.

`old_splitflux_layout` rewrites a SplitFlux package the way packages were written before its parts followed
the paper: `content` and `content_reembed` both carry the boundary blocks, there is no `boundary` part and no
`mix` sample, and adapter.json records no composition (its `parts` are the old one-line descriptions). The
kohya files are copied as they are: nothing here reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines import formats
from pipelines.package import AdapterPackage

OLD_SPLITFLUX_PARTS = {
    "content": "content blocks, both branches as one LoRA, plus the boundary blocks",
    "content_reembed": "content blocks' rank-48 branch alone, plus the boundary blocks",
    "style": "style blocks",
}
NEW_KEYS = ("composition", "paper_silent", "complementary_reduction", "optimizer", "lora_init")


def old_splitflux_layout(package: Path, out: Path) -> Path:
    """Copy `package` (a SplitFlux package of today) to `out` in the old layout; return `out`."""
    shutil.copytree(package, out)
    source = AdapterPackage.open(out)
    boundary = source.state_dict("boundary")
    for part in ("content", "content_reembed"):
        state = {**source.state_dict(part), **boundary}
        metadata = {"blockstudio.method": "splitflux", "blockstudio.part": part,
                    **formats.peft_metadata(state, "transformer")}
        formats.write_safetensors(out / f"{part}.safetensors", formats.to_diffusers(state, "transformer"), metadata)
    info = dict(source.info)
    for key in ("boundary", "kohya_boundary"):
        (out / info["files"][key]).unlink()
    (out / "samples" / "mix.png").unlink(missing_ok=True)
    files = {k: v for k, v in info["files"].items() if "boundary" not in k}
    files["samples"] = [s for s in files.get("samples", []) if s != "samples/mix.png"]
    info = {k: v for k, v in info.items() if k not in NEW_KEYS}
    info.update(files=files, parts=dict(OLD_SPLITFLUX_PARTS), format_version=1, name=out.name)
    (out / "adapter.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out
