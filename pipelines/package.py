"""The adapter package: the folder a training run, an import, the library, export and the Hub all share.

    <name>/
      pytorch_lora_weights.safetensors   the whole adapter, diffusers format (pipe.load_lora_weights(folder))
      content.safetensors, style.safetensors, ...   each part alone, diffusers format
      kohya/<name>.safetensors, kohya/<name>_<part>.safetensors   kohya/WebUI format for ComfyUI, A1111, Forge
      adapter.json                       method, base model, parts, composition, token, steps, seed, versions,
                                         files (`PackageInfo`, typed and versioned: see package_info.py)
      dylora.safetensors or sora.safetensors   the trained factors of a rank adapter (see rank_export.py)
      README.md                          model card with Hub front matter
      samples/*.png                      previews; samples/input.png is the trained crop

A package is written into a staging folder and renamed into place, so readers see the old package or the new
one, never a mixture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import torch
from PIL import Image

from pipelines import formats
from pipelines.checks import check_weights
from pipelines.errors import InvalidAdapter, UnsafeName
from pipelines.models import architecture
from pipelines.package_info import PACKAGE_FORMAT_VERSION, Composition, PackageInfo, PartInfo, as_package_info
from pipelines.storage import atomic_dir, write_json

__all__ = ["PACKAGE_FORMAT_VERSION", "AdapterPackage", "Composition", "PackageContents", "PackageInfo", "PartInfo",
           "check_name", "check_token", "describe_part", "image_number", "token_for_image", "write_package"]
FULL_WEIGHTS = "pytorch_lora_weights.safetensors"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_\[\]<>\-]{1,32}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
RESERVED_TOKENS = {"[c]", "[s]"}


def check_token(token: str) -> str:
    """A trigger token: short, no spaces, no path or prompt syntax beyond brackets (e.g. `[v42]`, `sks`)."""
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise UnsafeName(
            f"token {token!r} is not allowed: use 1-32 letters, digits, '_', '-', '[', ']', '<', '>' (e.g. [v42])"
        )
    if token.lower() in RESERVED_TOKENS:
        raise UnsafeName(f"token {token!r} is reserved for prompt placeholders")
    return token


def check_name(name: str) -> str:
    """A package or file name that cannot leave its folder: no separators, no leading dot, 64 chars."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise UnsafeName(
            f"name {name!r} is not allowed: use up to 64 letters, digits, '_', '-', '.', starting with a letter or digit"
        )
    return name


def image_number(image: Image.Image) -> str:
    """A number from 0 to 999 drawn from an image's pixels: the `42` of the tokens a run derives (`[v42]`)."""
    import hashlib

    digest = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
    return str(int(digest[:8], 16) % 1000)


def token_for_image(image: Image.Image) -> str:
    """A token unique to an image's pixels, in the style of the official examples (`[v18]`, `[v30]`)."""
    return f"[v{image_number(image)}]"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("blockstudio", "torch", "diffusers", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass
class PackageContents:
    """What a recipe hands `write_package`."""

    name: str
    info: PackageInfo | dict  # adapter.json: method, base model, arch, token, parts, composition, steps, ...
    full: dict[str, torch.Tensor]  # canonical state dict of the whole adapter
    parts: dict[str, dict[str, torch.Tensor]]  # role -> canonical state dict ("content", "style", ...)
    samples: dict[str, Image.Image] = field(default_factory=dict)  # file stem -> image
    loss_history: list[float] = field(default_factory=list)
    prefix: str | None = None  # the denoiser the keys belong to; None: the architecture's
    # file stem -> tensors written as-is to `<stem>.safetensors` (the trained factors of a DyLoRA or SoRA adapter)
    extra_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _file_metadata(info: dict, part: str) -> dict[str, object]:
    keys = ("method", "base_model", "arch", "token", "prompt", "steps", "seed", "resolution", "blocks", "ranks",
            "adapter", "style_token", "style_prompt", "rca_alpha", "gate", "watermark")
    meta = {f"blockstudio.{k}": info[k] for k in keys if k in info}
    meta["blockstudio.part"] = part
    meta["blockstudio.format_version"] = PACKAGE_FORMAT_VERSION
    return meta


def _network_dims(kohya: dict[str, torch.Tensor]) -> tuple[str, str]:
    """`ss_network_dim` and `ss_network_alpha` as the tensors hold them: one value, or "Dynamic" when the
    modules differ (what sd-scripts' resize tool writes for mixed ranks)."""
    dims = {int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    return (str(dims.pop()) if len(dims) == 1 else "Dynamic",
            f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic")


def _kohya_metadata(info: PackageInfo, part: str, kohya: dict[str, torch.Tensor]) -> dict[str, object]:
    arch = architecture(info.arch)
    meta = _file_metadata(info.to_dict(), part)
    trigger = info.trigger(part)
    dim, alpha = _network_dims(kohya)
    if arch.kohya_network_module:
        # sd-scripts' own module names (see formats.to_kohya), so its network module may be named.
        meta["ss_network_module"] = arch.kohya_network_module
    meta.update({
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_base_model_version": arch.kohya_base_version,
        "ss_output_name": f"{info.name or 'adapter'}_{part}",
        "ss_training_comment": f"{info.method} {part}; trigger {trigger}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": arch.modelspec_implementation,
        "modelspec.title": f"{info.name or 'adapter'} ({part})",
        "modelspec.trigger_phrase": trigger or "",
    })
    return meta


def _kohya_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if prefix == "transformer":
        return formats.to_kohya_flux(state)
    return formats.to_kohya(state, "lora_unet" if prefix == "unet" else f"lora_{prefix}")


def _write_kohya(path: Path, info: PackageInfo, part: str, state: dict[str, torch.Tensor], prefix: str) -> None:
    kohya = _kohya_state(state, prefix)
    formats.write_safetensors(path, kohya, _kohya_metadata(info, part, kohya))


def write_package(out: str | Path, contents: PackageContents, *, card: str | None = None,
                  replace: bool = False) -> Path:
    """Write a whole package atomically into `out` and return its path.

    An existing `out` is replaced only with `replace`; otherwise the write fails and leaves it as it is.
    """
    out = Path(out)
    name = check_name(contents.name)
    check_weights(contents.full, name)
    info = dataclasses.replace(as_package_info(contents.info))
    info.name = info.name or name
    files: dict[str, object] = {"full": FULL_WEIGHTS}
    with atomic_dir(out, replace=replace) as staging:
        prefix = contents.prefix or architecture(info.arch).denoiser
        file_meta = _file_metadata(info.to_dict(), "full")
        peft_meta = formats.peft_metadata(contents.full, prefix)
        formats.write_safetensors(staging / FULL_WEIGHTS, formats.to_diffusers(contents.full, prefix),
                                  {**file_meta, **peft_meta})
        _write_kohya(staging / "kohya" / f"{name}.safetensors", info, "full", contents.full, prefix)
        files["kohya"] = f"kohya/{name}.safetensors"
        for role, state in contents.parts.items():
            check_name(role)
            formats.write_safetensors(staging / f"{role}.safetensors", formats.to_diffusers(state, prefix),
                                      {**_file_metadata(info.to_dict(), role), **formats.peft_metadata(state, prefix)})
            files[role] = f"{role}.safetensors"
            _write_kohya(staging / "kohya" / f"{name}_{role}.safetensors", info, role, state, prefix)
            files[f"kohya_{role}"] = f"kohya/{name}_{role}.safetensors"
        for stem, tensors in contents.extra_files.items():
            check_name(stem)
            formats.write_safetensors(staging / f"{stem}.safetensors", tensors,
                                      _file_metadata(info.to_dict(), stem))
            files[stem] = f"{stem}.safetensors"
        if contents.samples:
            (staging / "samples").mkdir()
            for stem, image in contents.samples.items():
                check_name(stem)
                image.save(staging / "samples" / f"{stem}.png")
            files["samples"] = sorted(f"samples/{stem}.png" for stem in contents.samples)
        info.files = files
        info.created = info.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        info.versions = library_versions()
        info.scale_convention = ("a scale s multiplies the adapter's weight delta (diffusers set_adapters); "
                                 "the official B-LoRA alpha a equals s = a*a")
        if contents.loss_history:
            write_json(staging / "loss.json", {"loss": contents.loss_history})
        write_json(staging / "adapter.json", info.to_dict())
        if card is None:
            from pipelines.model_card import render_model_card

            card = render_model_card(info)
        (staging / "README.md").write_text(card)
    return out


def rewrite_weights(source: str | Path, out: str | Path, states: dict[str, dict[str, torch.Tensor]],
                    info: PackageInfo | dict, *, replace: bool = False, leave_out: tuple[str, ...] = (),
                    card: str | None = None) -> Path:
    """A copy of package `source` at `out` whose weight parts `states` (part -> canonical state) and adapter.json
    (`info`) are new; every other file but those `leave_out` names (relative paths) comes along as it is
    (hard-linked where possible). Each part's diffusers file and its kohya file are written again, and the model
    card is `card`, or rendered from `info`.

    `out` may be `source` itself with `replace`: the package is swapped in whole, never half written.
    """
    source, out = Path(source), Path(out)
    package = AdapterPackage.open(source)
    meta = dataclasses.replace(as_package_info(info))
    name = check_name(meta.name or package.name)
    # A copy under another name gets its kohya files renamed, as the library's rename does.
    moved = {rel: ("kohya/" + name + rel[len("kohya/") + len(package.name):]
                   if rel.startswith(f"kohya/{package.name}") else rel)
             for rel in meta.files.values() if isinstance(rel, str)}
    files = meta.files = {k: moved.get(v, v) if isinstance(v, str) else v for k, v in meta.files.items()}
    prefix = architecture(meta.arch).denoiser
    rewritten = {files[part] for part in states} | {files.get("kohya" if part == "full" else f"kohya_{part}")
                                                    for part in states} | {"adapter.json", "README.md"}
    record = meta.to_dict()
    with atomic_dir(out, replace=replace) as staging:
        for path in package_files(source):
            relative = moved.get(path.relative_to(source).as_posix(), path.relative_to(source).as_posix())
            if relative in rewritten or relative in leave_out:
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(path, target, follow_symlinks=False)
        for part, state in states.items():
            check_weights(state, f"{package.name} {part}")
            package.file(part)  # the part the package lists must be there, a regular file
            target = staging / files[part]
            target.parent.mkdir(parents=True, exist_ok=True)
            formats.write_safetensors(target, formats.to_diffusers(state, prefix),
                                      {**_file_metadata(record, part), **formats.peft_metadata(state, prefix)})
            kohya = files.get("kohya" if part == "full" else f"kohya_{part}")
            if isinstance(kohya, str):
                _write_kohya(staging / kohya, meta, part, state, prefix)
        write_json(staging / "adapter.json", record)
        if card is None:
            from pipelines.model_card import render_model_card

            card = render_model_card(meta)
        (staging / "README.md").write_text(card)
    return out


def describe_part(info: PackageInfo | dict, part: str) -> str:
    """What a part holds, from adapter.json: `blocks (branch xscale, ...)`, or the description an older package
    recorded, or the block of that role."""
    return as_package_info(info).describe_part(part)


def package_files(folder: str | Path, *, hidden: bool = False) -> list[Path]:
    """The regular files of a package folder, sorted; links (to files or folders) are never followed or listed,
    and names starting with a dot (staging leftovers, editor files) are left out unless `hidden`."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if (hidden or not d.startswith(".")) and not os.path.islink(Path(root, d)))
        for name in files:
            path = Path(root, name)
            if (hidden or not name.startswith(".")) and stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return sorted(found)


def has_links(folder: str | Path) -> bool:
    """Whether a package folder holds any symbolic link."""
    return any(os.path.islink(Path(root, n)) for root, dirs, files in os.walk(folder, followlinks=False)
               for n in dirs + files)


@dataclass
class AdapterPackage:
    """A package folder read back from disk: `info` is adapter.json as it is on disk, `meta` the typed record."""

    path: Path
    info: dict
    _meta: PackageInfo | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> AdapterPackage:
        path = Path(path)
        meta = path / "adapter.json"
        if not meta.is_file() or meta.is_symlink():
            raise InvalidAdapter(f"{path} is not an adapter package (no adapter.json)")
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidAdapter(f"{meta}: unreadable ({exc})") from None
        package = cls(path, info)
        package.meta  # noqa: B018 - an adapter.json that cannot be read is refused here, in one line
        return package

    @property
    def meta(self) -> PackageInfo:
        """adapter.json as a `PackageInfo` (older formats read as the current one)."""
        if self._meta is None:
            self._meta = PackageInfo.from_dict(self.info)
        return self._meta

    @property
    def name(self) -> str:
        return self.meta.name or self.path.name

    @property
    def token(self) -> str:
        return self.meta.token

    @property
    def style_token(self) -> str:
        """The token that stands for this package's style: its own where the recipe trains one, else the token."""
        return self.meta.trigger(self.meta.part_for("style"))

    @property
    def method(self) -> str:
        return self.meta.method

    @property
    def base_model(self) -> str:
        return self.meta.base_model

    def file(self, part: str) -> Path:
        files = self.meta.files
        if part not in files:
            raise InvalidAdapter(f"package {self.name} has no {part!r} part (it has {', '.join(self.parts())})")
        path = self.member(files[part]) if isinstance(files[part], str) else None
        if path is None:
            raise InvalidAdapter(f"package {self.name}: its {part!r} file is missing, or is a link or outside the package")
        return path

    def member(self, relative: str) -> Path | None:
        """A regular file inside the package, never reached through a link; None otherwise."""
        pure = PurePosixPath(relative)
        if pure.is_absolute() or not pure.parts or any(p in ("", ".", "..") for p in pure.parts):
            return None
        path, mode = self.path, 0
        for part in pure.parts:
            path = path / part
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                return None
            if stat.S_ISLNK(mode):
                return None
        return path if stat.S_ISREG(mode) else None

    def parts(self) -> list[str]:
        """The weight files the package holds, by part name (`full`, `content`, `style`, ...)."""
        return sorted(k for k in self.meta.files if k != "samples" and not k.startswith("kohya"))

    def has(self, part: str) -> bool:
        return part in self.meta.files

    @property
    def composition(self) -> dict:
        """Which part each use loads (`uses`: mix, content, reembed, style), which parts are optional, and
        whether the package recorded it (`recorded`; see `PackageInfo.used_composition`)."""
        used = self.meta.used_composition()
        return {**used.to_json(), "recorded": used.recorded}

    def part_for(self, use: str) -> str:
        """The part the package loads for `use`; a use it does not record falls back to the part of that name."""
        part = self.meta.part_for(use)
        if not self.has(part):
            raise InvalidAdapter(f"package {self.name} has no part for {use!r} (it has {', '.join(self.parts())})")
        return part

    def describe_part(self, part: str) -> str:
        return self.meta.describe_part(part)

    def composition_line(self) -> str:
        """One line saying what mixing and new prompts load, for the library."""
        comp = self.meta.used_composition()
        mix, reembed = comp.uses.get("mix", "content"), comp.uses.get("reembed", "content")
        head = f"{comp.name} composition" if comp.recorded else "older package (composition not recorded)"
        line = f"{head}: mix loads {mix} = {self.describe_part(mix)} with a style part"
        if reembed != mix:
            line += f"; new prompts load {reembed}"
        optional = [p for p in comp.optional if self.has(p)]
        if optional:
            line += f"; {', '.join(optional)} off unless asked for"
        return line

    def state_dict(self, part: str = "full") -> dict[str, torch.Tensor]:
        """The canonical state dict of one part, read from its diffusers file."""
        tensors, _ = formats.read_safetensors(self.file(part))
        prefix = architecture(self.meta.arch).denoiser
        modules = sorted({k[len(prefix) + 1:].rsplit(".lora.", 1)[0] for k in tensors})
        return formats.normalize_lora(tensors, modules, component=prefix)

    def sample(self, stem: str) -> Path | None:
        """A preview image of the package (a regular file, never a link)."""
        return self.member(f"samples/{stem}.png")
