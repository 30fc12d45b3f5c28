"""The Block Studio web app: `build_app()` assembles the tabs around the process-wide services, `launch()` serves it.

`blockstudio app` and the Space's `app.py` both call `launch()`. With a GPU the studio offers SDXL (and Flux);
without one it runs on the tiny offline models and says so at the top of the page.
"""

from __future__ import annotations

import atexit
import os
import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.models import ARCHITECTURES, REGISTRY
from pipelines.storage import home_dir
from studio.gpu import on_zero_gpu
from studio.jobs import JobManager
from studio.methods import METHODS
from studio.mixing import GenerationService
from studio.ui import library as library_tab
from studio.ui import mix as mix_tab
from studio.ui import reembed as reembed_tab
from studio.ui import share as share_tab
from studio.ui import train as train_tab
from studio.ui.common import Studio, banner, picker_updates
from studio.workers import worker_from_environment
from studio.workspace import is_workspace_id, new_workspace_id, secret_file, workspaces_root

MAX_UPLOAD = os.environ.get("BLOCKSTUDIO_MAX_UPLOAD", "1gb")  # a rank-64 SDXL package zip is about 500 MB

CSS = """
.bs-header h1 { margin: 0; font-size: 28px; display: flex; align-items: center; gap: 10px; }
.bs-header p { margin: 4px 0 0; opacity: .8; }
.bs-logo { display: inline-flex; gap: 3px; }
.bs-logo i { display: block; width: 14px; height: 22px; border-radius: 3px; background: #6366f1; }
.bs-logo i + i { background: #ec4899; margin-top: 6px; height: 16px; }
.bs-banner { border-radius: 10px; padding: 10px 14px !important; margin-bottom: 6px; }
.bs-banner.cpu { background: #fff7e6; border: 1px solid #f5c26b; color: #5c3b00; }
.bs-banner.zero { background: #eef4ff; border: 1px solid #9db8f2; color: #1d3571; }
.bs-banner p { margin: 0; }
.bs-job { border: 1px solid var(--border-color-primary); border-radius: 12px; padding: 14px 16px;
          background: var(--block-background-fill); }
.bs-job.bs-empty { color: var(--body-text-color-subdued); }
.bs-job-head { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 10px; }
.bs-dim { color: var(--body-text-color-subdued); }
.bs-badge { font-size: 12px; font-weight: 600; padding: 2px 10px; border-radius: 999px;
            background: #e5e7eb; color: #374151; text-transform: uppercase; letter-spacing: .04em; }
.bs-running .bs-badge, .bs-cancelling .bs-badge { background: #e0e7ff; color: #3730a3; }
.bs-done .bs-badge { background: #dcfce7; color: #166534; }
.bs-failed .bs-badge { background: #fee2e2; color: #991b1b; }
.bs-cancelled .bs-badge, .bs-interrupted .bs-badge { background: #fef3c7; color: #92400e; }
.bs-bar { height: 12px; border-radius: 999px; background: var(--neutral-200, #e5e7eb); overflow: hidden; }
.bs-bar > div { height: 100%; border-radius: 999px; transition: width .6s ease;
                background: linear-gradient(90deg, #6366f1, #ec4899); }
.bs-stats { display: flex; gap: 22px; flex-wrap: wrap; margin-top: 8px; font-variant-numeric: tabular-nums; }
.bs-note { margin-top: 8px; color: var(--body-text-color-subdued); }
.bs-ops { margin-top: 8px; font-size: 12px; }
"""


def detect_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def default_models(gpu: bool) -> dict[str, str]:
    """Base model per architecture: SDXL and Flux on a GPU, the tiny ones elsewhere; BLOCKSTUDIO_MODEL overrides."""
    models = {arch.name: arch.default_model if gpu else arch.tiny_model for arch in ARCHITECTURES.values()}
    chosen = os.environ.get("BLOCKSTUDIO_MODEL")
    if chosen in REGISTRY and not REGISTRY[chosen].random_weights:
        models[REGISTRY[chosen].arch] = chosen
    return models


def training_options() -> dict[str, Any]:
    """Where jobs run: on a Ray cluster when BLOCKSTUDIO_RAY_ADDRESS is set (`studio/ray_worker.py`); else in the
    server's process, in chunks of GPU calls on ZeroGPU (`studio/zerogpu.py`) and in one go elsewhere."""
    worker = worker_from_environment()
    if worker is not None:
        return {"worker": worker}
    if not on_zero_gpu():
        return {}
    from studio.zerogpu import ChunkedRunner

    return {"runner": ChunkedRunner.from_environment()}


def browser_secret(home: Path) -> str:
    """The key the browser's workspace id is stored under; stable across restarts so users find their work.

    Gradio publishes it in the page, so it hides the id from nothing but casual reading; what makes an id
    trustworthy is the server's signature on it (`studio.workspace`).
    """
    if os.environ.get("BLOCKSTUDIO_SECRET"):
        return os.environ["BLOCKSTUDIO_SECRET"]
    return secret_file(home / "browser-secret", lambda: secrets.token_urlsafe(24))


def build_app(home: Path | None = None, *, jobs: JobManager | None = None,
              generation: GenerationService | None = None, hub_endpoint: str | None = None,
              gpu: bool | None = None) -> gr.Blocks:
    """The whole studio as a Gradio Blocks; its services are reachable as `demo.studio` (for tests)."""
    home = Path(home) if home is not None else home_dir()
    gpu = detect_gpu() if gpu is None else gpu
    hotswap_rank = int(os.environ.get("BLOCKSTUDIO_HOTSWAP_RANK", "128")) or None
    studio = Studio(
        home=home,
        jobs=jobs or JobManager(home, **training_options()),
        generation=generation or GenerationService(hotswap_rank=hotswap_rank),
        gpu=gpu,
        default_models=default_models(gpu),
        hub_endpoint=hub_endpoint,
    )
    first_arch = next((m.arch for m in METHODS.values()), "sdxl")
    notice = banner(gpu, studio.default_models.get(first_arch))
    with gr.Blocks(title="Block Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        studio.workspace = gr.BrowserState(None, storage_key="blockstudio-workspace", secret=browser_secret(home))
        gr.HTML("<div class='bs-header'><h1><span class='bs-logo' aria-hidden='true'><i></i><i></i></span>"
                "Block Studio</h1><p>One image in, a <b>content</b> adapter and a <b>style</b> adapter out. Then "
                "mix them: the subject of one picture in the style of another.</p></div>")
        if notice:
            studio.banner = gr.Markdown(notice[1], elem_classes=["bs-banner", notice[0]], elem_id="bs-banner")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(studio)
            with gr.Tab("Library", id="library", elem_id="tab-library") as library_page:
                library = library_tab.build(studio)
            with gr.Tab("Mix", id="mix", elem_id="tab-mix") as mix_page:
                mix = mix_tab.build(studio)
            with gr.Tab("Re-embed", id="reembed", elem_id="tab-reembed") as reembed_page:
                reembed_tab.build(studio)
            with gr.Tab("Share", id="share", elem_id="tab-share") as share_page:
                share_tab.build(studio)
            with gr.Tab("Adapter lab", id="lab", elem_id="tab-lab"):
                from studio.ui import lab

                lab.build(studio)
        _wire_pages(demo, studio, train, library, mix, [library_page, mix_page, reembed_page, share_page])
    demo.studio = studio
    return demo


def _wire_pages(demo: gr.Blocks, studio: Studio, train, library, mix, pages: list[gr.Tab]) -> None:
    """Page load restores the workspace and the newest job; opening a tab refreshes its package lists."""
    ws = studio.workspace
    pickers = [p.dropdown for p in studio.package_pickers]

    def open_workspace(current: str | None) -> str:
        return current if is_workspace_id(current, studio.home) else new_workspace_id(studio.home)

    def refresh_pickers(workspace_id: str | None, *selected: str | None):
        return picker_updates(studio, workspace_id, list(selected))

    private = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
    (demo.load(open_workspace, [ws], [ws], api_name="workspace", concurrency_limit=None)
     .then(train.load_job, [ws], [train.job] + train.status_outputs, **private)
     .then(refresh_pickers, [ws] + pickers, pickers, **private)
     .then(library.refresh, [ws], library.outputs, **private)
     .then(mix.refresh, [ws], mix.outputs, **private))
    for page in pages:
        page.select(refresh_pickers, [ws] + pickers, pickers, **private)
    # A mix needs one base model: choosing a content package narrows the style list to its base model.
    for picker in studio.package_pickers:
        if picker.partner is not None:
            picker.partner.input(refresh_pickers, [ws] + pickers, pickers, **private)
    pages[0].select(library.refresh, [ws], library.outputs, **private)


def launch_options(demo: gr.Blocks) -> dict[str, Any]:
    """What `launch()` needs besides host and port: look, upload limit, and which files may be served."""
    studio: Studio = demo.studio
    root = workspaces_root(studio.home)
    root.mkdir(parents=True, exist_ok=True)
    return {
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="pink"),
        "css": CSS,
        "max_file_size": MAX_UPLOAD,
        # Results and previews live in workspaces; a file there can only be named with its workspace's secret id.
        "allowed_paths": [str(root)],
        "show_error": False,
        "footer_links": ["api", "settings"],
    }


def launch(host: str = "127.0.0.1", port: int | None = 7860, share: bool = False, *, demo: gr.Blocks | None = None,
           **kwargs: Any):
    """Build (unless given) and serve the studio; extra keyword arguments go to `Blocks.launch`."""
    demo = demo or build_app()
    atexit.register(demo.studio.jobs.close)
    demo.queue(max_size=64, default_concurrency_limit=1)
    options = {**launch_options(demo), **kwargs}
    return demo.launch(server_name=host, server_port=port, share=share, **options)
