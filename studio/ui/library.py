"""The Library tab: every package of the workspace with its thumbnail and facts; rename, delete, import, inspect."""

from __future__ import annotations

import colorsys
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.storage import atomic_file
from studio.library import PackageSummary, tokens_of
from studio.methods import METHODS, models_for
from studio.ui.common import Studio, checked_upload, format_size, handler
from studio.workspace import Workspace

EMPTY = ("Your library is empty. Train a package in the **Train** tab, or import a Block Studio package "
         "(.zip) or a LoRA .safetensors file below.")


@dataclass
class LibraryTab:
    outputs: list
    refresh: Any


def build(studio: Studio) -> LibraryTab:
    ws = studio.workspace
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Packages", columns=4, height=420, allow_preview=False, fit_columns=False,
                                 object_fit="cover", elem_id="library-gallery", buttons=[])
            empty = gr.Markdown(EMPTY, visible=True)
            refresh = gr.Button("Refresh", size="sm")
        with gr.Column(scale=2):
            package = studio.package_picker("Package", None, elem_id="library-package")
            facts = gr.Markdown()
            with gr.Row():
                new_name = gr.Textbox(label="New name", max_length=64, scale=3)
                rename = gr.Button("Rename", scale=1)
            delete = gr.Button("Delete…", variant="stop")
            with gr.Group(visible=False) as confirm_box:
                confirm_text = gr.Markdown()
                with gr.Row():
                    confirm = gr.Button("Delete permanently", variant="stop", elem_id="library-confirm-delete")
                    keep = gr.Button("Keep it")
            with gr.Accordion("Metadata", open=False):
                details = gr.JSON(label="adapter.json and files")
    with gr.Accordion("Import a package or a LoRA file", open=False):
        with gr.Row():
            upload = gr.File(label="Package .zip or .safetensors", file_types=[".zip", ".safetensors"],
                             file_count="single", height=140)
            with gr.Column():
                import_name = gr.Textbox(label="Name", placeholder="from the file name", max_length=64)
                importers = [m for m in METHODS.values() if m.importer is not None]
                archs = list(dict.fromkeys(m.arch for m in importers))
                import_model = gr.Dropdown([s.name for arch in archs for s in models_for(arch)],
                                           value=studio.default_models.get(archs[0]) if archs else None,
                                           label="Base model (for .safetensors)")
                import_token = gr.Textbox(label="Trigger token it was trained with (for .safetensors)",
                                          placeholder="[v] if unknown", max_length=32)
                import_method = gr.Dropdown([(m.label, m.key) for m in importers],
                                            value=importers[0].key if importers else None,
                                            label="Method (for .safetensors)", elem_id="library-import-method")
        do_import = gr.Button("Import", variant="primary")

    def listing(workspace_id):
        summaries = studio.library(workspace_id).list()
        items = [(str(s.thumbnail), s.caption) for s in summaries if s.thumbnail]
        # A package without previews (an imported file) still needs a tile: one that names it.
        workspace = studio.workspace_of(workspace_id)
        items += [(str(name_tile(workspace, s)), s.caption) for s in summaries if not s.thumbnail]
        names = [s.name for s in summaries if s.thumbnail] + [s.name for s in summaries if not s.thumbnail]
        return items, names

    @handler
    def show_library(workspace_id, selected):
        items, names = listing(workspace_id)
        value = selected if selected in names else (names[0] if names else None)
        choices = [(caption, name) for (_, caption), name in zip(items, names, strict=True)]
        return (items, gr.Markdown(visible=not items), gr.Dropdown(choices=choices, value=value), names)

    @handler
    def inspect(workspace_id, name):
        if not name:
            return "", {}, ""
        library = studio.library(workspace_id)
        data = library.inspect(name)
        info = data["adapter"]
        origin = (f"imported from `{info['imported_from']}`" if info.get("imported_from")
                  else f"{info.get('steps', '–')} steps")
        package = library.open(name)
        method = METHODS.get(package.method)
        facts = (f"**{name}** · {info.get('method', '?')}{f' ({method.label})' if method else ''} on "
                 f"`{info.get('base_model', '?')}`  \n"
                 f"Token `{tokens_of(info)}` · {rank_text(info)} · {origin} · "
                 f"{str(info.get('created', ''))[:16].replace('T', ' ')} · {format_size(sum(data['files'].values()))}  \n"
                 f"Parts: {', '.join(p for p in package.parts() if p != 'full')}  \n"
                 f"Composition: {package.composition_line()}")
        return facts, data, name.removeprefix("shared:")

    @handler
    def rename_package(workspace_id, name, wanted):
        new = studio.library(workspace_id).rename(name, wanted)
        studio.jobs.package_renamed(studio.workspace_of(workspace_id).id, name, new)
        gr.Info(f"Renamed {name} to {new}.")
        return show_library(workspace_id, new)

    def ask_delete(name):
        if not name:
            raise gr.Error("Choose a package first.", print_exception=False)
        return gr.Group(visible=True), f"Delete **{name}** and all its files? This cannot be undone."

    @handler
    def delete_package(workspace_id, name):
        studio.library(workspace_id).delete(name)
        gr.Info(f"Deleted {name}.")
        return show_library(workspace_id, None) + (gr.Group(visible=False),)

    @handler
    def import_package(workspace_id, path, name, model, token, method=None):
        # `method` comes from a state the Method box keeps, no part of the API: `/import` keeps its parameters.
        if not path:
            raise gr.Error("Choose a .zip or .safetensors file to import.", print_exception=False)
        imported = studio.library(workspace_id).import_file(checked_upload(path), name=name or None,
                                                          model=model or None, token=token or None,
                                                          method=method or None)
        gr.Info(f"Imported {imported}.")
        return show_library(workspace_id, imported) + (None,)

    names = gr.State([])
    listed = [gallery, empty, package, names]

    def select_tile(names_now, evt: gr.SelectData):
        return names_now[evt.index] if evt.index is not None and evt.index < len(names_now) else gr.skip()

    cheap = dict(concurrency_limit=None, show_progress="hidden")
    refresh.click(show_library, [ws, package], listed, api_name="library", **cheap)
    gallery.select(select_tile, [names], [package], api_visibility="private", **cheap)
    package.change(inspect, [ws, package], [facts, details, new_name], api_name="inspect", **cheap)
    rename.click(rename_package, [ws, package, new_name], listed, api_name="rename", **cheap)
    delete.click(ask_delete, [package], [confirm_box, confirm_text], api_visibility="private", **cheap)
    keep.click(lambda: gr.Group(visible=False), None, [confirm_box], api_visibility="private", **cheap)
    confirm.click(delete_package, [ws, package], listed + [confirm_box], api_name="delete", **cheap)
    chosen_method = gr.State(import_method.value)

    def choose_method(key):
        """The chosen recipe, kept for `/import`, and the base models of its architecture."""
        method = METHODS.get(key)
        if method is None:
            return gr.skip(), gr.skip()
        return key, gr.Dropdown(choices=[s.name for s in models_for(method.arch)],
                                value=studio.default_models.get(method.arch))

    import_method.change(choose_method, [import_method], [chosen_method, import_model], api_visibility="private",
                         **cheap)
    do_import.click(import_package, [ws, upload, import_name, import_model, import_token, chosen_method],
                    listed + [upload],
                    api_name="import", concurrency_limit=2, show_progress_on=[upload])
    return LibraryTab(outputs=listed, refresh=lambda workspace_id: show_library(workspace_id, None))


def rank_text(info: dict) -> str:
    """`rank 64`, or each part's rank where they differ (an imported file records them per part)."""
    if isinstance(info.get("rank"), int):
        return f"rank {info['rank']}"
    ranks = info.get("ranks")
    if isinstance(ranks, dict) and ranks:
        if len(set(ranks.values())) == 1:
            return f"rank {next(iter(ranks.values()))}"
        return "ranks " + ", ".join(f"{part} {rank}" for part, rank in ranks.items())
    return "rank ?"


def name_tile(workspace: Workspace, summary: PackageSummary) -> Path:
    """A tile for a package without a preview image: its name and method on a colour of its own."""
    digest = hashlib.sha256(f"{summary.name}|{summary.method}|{summary.base_model}".encode()).hexdigest()
    path = workspace.folder("tiles") / f"{digest[:20]}.png"
    if not path.is_file():
        from PIL import Image, ImageDraw, ImageFont

        hue = int(digest[:2], 16) / 255
        background = tuple(int(255 * c) for c in colorsys.hls_to_rgb(hue, 0.9, 0.45))
        tile = Image.new("RGB", (256, 256), background)
        draw = ImageDraw.Draw(tile)
        title = summary.title if len(summary.title) <= 18 else summary.title[:17] + "…"
        draw.text((128, 112), title, fill=(40, 40, 60), font=ImageFont.load_default(size=24), anchor="mm")
        draw.text((128, 150), f"{summary.method} · no preview", fill=(90, 90, 110),
                  font=ImageFont.load_default(size=15), anchor="mm")
        with atomic_file(path) as tmp:
            tile.save(tmp, format="PNG")
    return path
