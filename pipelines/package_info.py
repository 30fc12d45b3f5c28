"""adapter.json as a typed, versioned record: `PackageInfo` reads every layout Block Studio has written and writes
the current one.

Format versions:

- 1: what every package held until format 2. Packages from before compositions were recorded (SplitFlux's
  first layout) carry no `composition` and describe their parts in one line of text each; B-LoRA and imported
  packages carry no `parts` at all, only `blocks` and `ranks`.
- 2: every part a package holds has an entry in `parts` (its blocks, rank and description; the branches of a
  part that joins several), and a recipe's package records its `composition` (which part each use loads).

Reading a format-1 package gives the same record a format-2 one would, except that a composition it never
recorded stays unrecorded (`Composition.recorded` is False: the package is used as it always was, and the
library says so). A package of a newer format than this code writes is refused in one line. Keys this module
does not know (a recipe's own facts: SplitFlux's gate, its paper-silent choices, ...) are kept in `extra` and
written back as they were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import InvalidAdapter

PACKAGE_FORMAT_VERSION = 2
USES = ("mix", "content", "reembed", "style")  # what a package's parts are loaded for


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _bad(key: str, what: str, value: object) -> InvalidAdapter:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return InvalidAdapter(f"adapter.json: {key} must be {what}, not {shown}")


@dataclass
class PartInfo:
    """One entry of `parts`: which blocks a part covers, at which rank, and what it is for."""

    blocks: str | None = None
    rank: int | None = None
    description: str | None = None
    branches: dict[str, float] | None = None  # a part made of several trained branches, with their weights
    parts: list[str] | None = None  # the `full` entry: the parts it joins

    @classmethod
    def from_json(cls, key: str, value: object) -> PartInfo:
        if isinstance(value, str):  # format 1 before compositions: a line of text saying what the part holds
            return cls(blocks=value)
        if not isinstance(value, dict):
            raise _bad(f"parts.{key}", "an object", value)
        blocks, rank, description = value.get("blocks"), value.get("rank"), value.get("description")
        branches, parts = value.get("branches"), value.get("parts")
        if blocks is not None and not isinstance(blocks, str):
            raise _bad(f"parts.{key}.blocks", "text", blocks)
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
            raise _bad(f"parts.{key}.rank", "a whole number", rank)
        if description is not None and not isinstance(description, str):
            raise _bad(f"parts.{key}.description", "text", description)
        if branches is not None and not (isinstance(branches, dict) and all(
                isinstance(k, str) and _is_number(v) for k, v in branches.items())):
            raise _bad(f"parts.{key}.branches", "branch names with numbers", branches)
        if parts is not None and not _names(parts):
            raise _bad(f"parts.{key}.parts", "a list of part names", parts)
        return cls(blocks, rank, description, branches, parts)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def describe(self) -> str:
        """`blocks (branch xweight, ...)`: what the part holds, for the library and the card."""
        listed = ", ".join(f"{b} x{w:g}" for b, w in self.branches.items()) if self.branches else ""
        return str(self.blocks or "?") + (f" ({listed})" if listed else "")


@dataclass
class Composition:
    """Which part each use of a package loads (`uses`: mix, content, reembed, style), and the parts that are
    loaded only when asked for (`optional`). `recorded` is False for a package written before compositions were
    recorded: it keeps the composition it was always used with."""

    name: str
    uses: dict[str, str]
    optional: list[str] = field(default_factory=list)
    recorded: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "optional": list(self.optional), "uses": dict(self.uses)}

    @classmethod
    def from_json(cls, value: object) -> Composition | None:
        if not (isinstance(value, dict) and isinstance(value.get("uses"), dict)
                and all(isinstance(k, str) for k in value["uses"]) and _names(list(value["uses"].values()))
                and _names(value.get("optional", []))):
            return None
        return cls(str(value.get("name", "recorded")), dict(value["uses"]), list(value.get("optional", [])))

    @classmethod
    def legacy(cls, has_reembed: bool) -> Composition:
        """The composition packages were used with before it was recorded: the content part for mixing, the
        re-embedding branch (where there is one) for new prompts."""
        return cls("unrecorded", {"mix": "content", "content": "content",
                                  "reembed": "content_reembed" if has_reembed else "content", "style": "style"},
                   [], recorded=False)


# Keys of adapter.json this module reads, with the JSON types each may hold.
_SCALARS: dict[str, tuple[type, ...]] = {
    "method": (str,), "arch": (str,), "base_model": (str,), "base_model_id": (str,), "name": (str,),
    "token": (str,), "style_token": (str,), "prompt": (str,), "rank": (int,), "steps": (int,),
    "learning_rate": (int, float), "seed": (int,), "resolution": (int,), "final_loss": (int, float),
    "image_sha256": (str,), "imported_from": (str,), "exported_from": (str,), "created": (str,),
    "scale_convention": (str,),
}
_MAPPINGS: dict[str, tuple[type, ...]] = {
    "blocks": (str,), "ranks": (int,), "sample_prompts": (str,), "versions": (str,), "source_metadata": (str,),
}


@dataclass
class PackageInfo:
    """adapter.json of a package. `extra` holds the keys a recipe records beyond these (written back as they are)."""

    method: str = ""
    arch: str = "sdxl"
    base_model: str = ""
    name: str = ""
    token: str = "[v]"
    style_token: str | None = None  # a recipe that trains a token of its own for the style (SplitFlux)
    prompt: str | None = None
    blocks: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    rank: int | None = None
    composition: Composition | None = None
    parts: dict[str, PartInfo] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)  # part or file stem -> path (samples: a list of paths)
    adapter: dict[str, Any] | None = None  # the rank adapter (DyLoRA, SoRA) a package was trained with
    target_modules: list[str] | None = None
    steps: int | None = None
    learning_rate: float | None = None
    seed: int | None = None
    resolution: int | None = None
    image_sha256: str | None = None
    sample_prompts: dict[str, str] = field(default_factory=dict)
    final_loss: float | None = None
    base_model_id: str | None = None
    imported_from: str | None = None
    source_metadata: dict[str, str] | None = None
    exported_from: str | None = None
    created: str | None = None
    versions: dict[str, str] | None = None
    scale_convention: str | None = None
    format_version: int = PACKAGE_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading --------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object) -> PackageInfo:
        """The record of any adapter.json Block Studio has written (see the module docstring)."""
        if not isinstance(data, dict):
            raise InvalidAdapter("adapter.json must hold an object")
        version = data.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _bad("format_version", "a whole number of at least 1", version)
        if version > PACKAGE_FORMAT_VERSION:
            raise InvalidAdapter(f"adapter.json is format {version}, newer than this Block Studio reads (up to "
                                 f"{PACKAGE_FORMAT_VERSION}); update Block Studio to use this package")
        values: dict[str, Any] = {}
        for key, types in _SCALARS.items():
            if data.get(key) is not None:
                value = data[key]
                if not isinstance(value, types) or isinstance(value, bool):
                    raise _bad(key, "a number" if int in types else "text", value)
                values[key] = value
        for key, types in _MAPPINGS.items():
            if data.get(key) is not None:
                value = data[key]
                if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, types)
                                                          and not isinstance(v, bool) for k, v in value.items()):
                    raise _bad(key, "an object of " + ("numbers" if int in types else "texts"), value)
                values[key] = dict(value)
        files = data.get("files", {})
        if not isinstance(files, dict) or not all(isinstance(v, str) or _names(v) for v in files.values()):
            raise _bad("files", "an object of file names", files)
        values["files"] = dict(files)
        if data.get("adapter") is not None:
            if not isinstance(data["adapter"], dict):
                raise _bad("adapter", "an object", data["adapter"])
            values["adapter"] = dict(data["adapter"])
        if data.get("target_modules") is not None:
            if not _names(data["target_modules"]):
                raise _bad("target_modules", "a list of module names", data["target_modules"])
            values["target_modules"] = list(data["target_modules"])
        raw_parts = data.get("parts")
        if raw_parts is not None and not isinstance(raw_parts, dict):
            raise _bad("parts", "an object", raw_parts)
        parts = {str(k): PartInfo.from_json(k, v) for k, v in (raw_parts or {}).items()}
        # Format 1 recorded the blocks and ranks of B-LoRA's and imported packages' parts, but no `parts`.
        for role, blocks in values.get("blocks", {}).items():
            if role not in parts and role in files:
                parts[role] = PartInfo(blocks=blocks, rank=values.get("ranks", {}).get(role))
        composition = Composition.from_json(data.get("composition"))
        known = set(_SCALARS) | set(_MAPPINGS) | {"files", "adapter", "target_modules", "parts", "composition",
                                                  "format_version"}
        return cls(**values, parts=parts, composition=composition, format_version=version,
                   extra={k: v for k, v in data.items() if k not in known})

    def used_composition(self) -> Composition:
        """The composition the package records, or the one it was always used with (`Composition.legacy`)."""
        return self.composition or Composition.legacy("content_reembed" in self.files)

    def part_for(self, use: str) -> str:
        """The part recorded for `use`; a use it does not record falls back to the part of that name."""
        return self.used_composition().uses.get(use, use)

    def trigger(self, part: str) -> str:
        """The token that calls up `part`: the style token for the part a style is loaded from, else the token."""
        if part == self.part_for("style"):
            return self.style_token or self.token
        return self.token

    def describe_part(self, part: str) -> str:
        """What a part holds: its blocks and branches, or the line an older package recorded."""
        entry = self.parts.get(part)
        if entry is not None:
            return entry.describe() if entry.blocks or entry.branches else str(entry.description or part)
        return str(self.blocks.get(part, part))

    # -- writing --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """adapter.json at the current format (unset and empty values left out; `extra` keys as they were)."""
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "composition", "parts") or value is None:
                continue
            if isinstance(value, dict | list) and not value and f.name not in ("files",):
                continue
            out[f.name] = value
        if self.composition is not None and self.composition.recorded:
            out["composition"] = self.composition.to_json()
        if self.parts:
            out["parts"] = {k: v.to_json() for k, v in self.parts.items()}
        out["format_version"] = PACKAGE_FORMAT_VERSION
        return out


def as_package_info(info: PackageInfo | dict) -> PackageInfo:
    """A `PackageInfo` from one, or from an adapter.json object."""
    return info if isinstance(info, PackageInfo) else PackageInfo.from_dict(info)
