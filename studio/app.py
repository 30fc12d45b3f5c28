"""The Block Studio web app: a minimal first version that trains a B-LoRA and mixes packages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipelines.storage import home_dir


def default_model() -> str:
    """Real SDXL on a GPU, the tiny offline model elsewhere (or when BLOCKSTUDIO_MODEL says so)."""
    import torch

    return os.environ.get("BLOCKSTUDIO_MODEL") or ("sdxl" if torch.cuda.is_available() else "tiny-sdxl")


def build_app():
    import gradio as gr

    from pipelines.blora import TrainRequest, train_blora
    from pipelines.generation import AdapterChoice, StudioPipeline
    from pipelines.package import AdapterPackage

    model = default_model()
    packages = home_dir() / "packages"

    def train(image_path, steps, progress=gr.Progress()):
        if not image_path:
            raise gr.Error("upload an image first")
        out = Path(tempfile.mkdtemp(prefix="pkg-", dir=packages.mkdir(parents=True, exist_ok=True) or packages))
        try:
            path = train_blora(
                TrainRequest(image=image_path, out=out / "adapter", model=model, steps=int(steps)),
                on_progress=lambda e: progress(e.step / e.total_steps, desc=f"step {e.step}, loss {e.loss:.3f}"),
            )
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return str(path), str(path / "samples" / "full.png")

    def mix(content_dir, style_dir, prompt, seed):
        studio = StudioPipeline(model)
        content = AdapterChoice(AdapterPackage.open(content_dir), "content") if content_dir else None
        style = AdapterChoice(AdapterPackage.open(style_dir), "style") if style_dir else None
        return studio.generate(prompt or None, content=content, style=style, seed=int(seed))[0]

    with gr.Blocks(title="Block Studio") as demo:
        gr.Markdown(f"# Block Studio\nBase model: `{model}`")
        with gr.Row():
            image = gr.Image(type="filepath", label="Your image")
            steps = gr.Number(value=1000 if model == "sdxl" else 50, label="Steps", precision=0)
        package = gr.Textbox(label="Package folder")
        sample = gr.Image(label="Sample")
        gr.Button("Train").click(train, [image, steps], [package, sample])
        content_dir = gr.Textbox(label="Content package")
        style_dir = gr.Textbox(label="Style package")
        prompt = gr.Textbox(label="Prompt", value="A [c] in [s] style")
        seed = gr.Number(value=0, label="Seed", precision=0)
        result = gr.Image(label="Result")
        gr.Button("Generate").click(mix, [content_dir, style_dir, prompt, seed], result)
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    build_app().queue().launch(server_name=host, server_port=port, share=share)
