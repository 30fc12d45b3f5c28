"""The Share tab: download a package as a zip, or push it to the Hugging Face Hub with a one-push token; sign a
package with its owner's MarkBoard signature, or read a package's signature back.

A package trained with a DyLoRA or SoRA adapter gets a rank control: its zip and its Hub push hold the package at
the rank chosen there, as an ordinary package of that size.
"""

from __future__ import annotations

import html
import os
import zipfile

import gradio as gr

from pipelines.watermark import parse_bits
from studio.hub import push_package
from studio.ui.common import Studio, format_size, handler


def build(studio: Studio) -> None:
    ws = studio.workspace
    package = studio.package_picker("Package", None, elem_id="share-package")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Download\nThe whole package: diffusers files (`pipe.load_lora_weights(folder)`), "
                        "kohya files for ComfyUI, A1111 and Forge, `adapter.json`, the model card and samples.")
            # 0 stands for "the package as it is"; a rank package narrows the range to its own.
            rank = gr.Slider(0, 1024, value=0, step=1, label="Rank", visible=False, elem_id="share-rank")
            prepare = gr.Button("Prepare zip", elem_id="share-prepare")
            download = gr.DownloadButton("Download zip", visible=False, variant="primary",
                                         elem_id="share-download")
            contents = gr.Markdown(elem_id="share-contents")
        with gr.Column():
            gr.Markdown("### Push to the Hugging Face Hub\nCreates a model repository with the package and its "
                        "model card; the sample images become the card's widgets.")
            repo = gr.Textbox(label="Repository", placeholder="your-name/cat-blora", max_length=200)
            private = gr.Checkbox(value=True, label="Private repository")
            env_token = bool(os.environ.get("HF_TOKEN"))
            token = gr.Textbox(
                label="Write token", type="password", max_length=512, elem_id="share-token",
                placeholder=("HF_TOKEN is set on this server; leave empty to use it" if env_token
                             else "hf_… used for this push only, never stored"),
            )
            push = gr.Button("Push", variant="primary", elem_id="share-push")
            pushed = gr.Markdown(elem_id="share-pushed")

    sign_section(studio, package)

    @handler
    def choose_package(workspace_id, name):
        """A new package: no zip yet, and the rank control where the package can be exported at other ranks."""
        found = studio.library(workspace_id).rank_range(name) if name else None
        if found is None:
            rank_control = gr.Slider(minimum=0, maximum=1024, value=0, visible=False)
        else:
            low, high, current = found
            kind = studio.library(workspace_id).open(name).info["adapter"]["type"]
            rank_control = gr.Slider(
                minimum=low, maximum=high, value=current, visible=True,
                info=f"Trained with {'DyLoRA' if kind == 'dylora' else 'SoRA'}: the zip and the Hub push hold "
                     f"the package at this rank ({low}–{high}); smaller is a smaller file.")
        return gr.DownloadButton(visible=False), "", rank_control

    @handler
    def prepare_zip(workspace_id, name, chosen_rank=None):
        path = studio.library(workspace_id).export_zip(name, rank=chosen_rank or None)
        with zipfile.ZipFile(path) as archive:
            rows = [f"| `{i.filename}` | {format_size(i.file_size)} |" for i in archive.infolist()]
        table = "| file | size |\n| --- | --- |\n" + "\n".join(rows)
        return (gr.DownloadButton(value=str(path), label=f"Download {path.name} ({format_size(path.stat().st_size)})",
                                  visible=True), table)

    @handler
    def push_to_hub(workspace_id, name, repo_id, make_private, typed_token, chosen_rank=None):
        # The rank control applies to the push as to the zip: a DyLoRA or SoRA package goes up at the chosen rank.
        with studio.library(workspace_id).at_rank(name, chosen_rank or None) as folder:
            result = push_package(folder, repo_id, token=typed_token or None, private=bool(make_private),
                                  endpoint=studio.hub_endpoint)
        url = html.escape(result.repo_url)
        return f"Pushed {result.files} files to <a href='{url}' target='_blank'>{url}</a>."

    cheap = dict(concurrency_limit=None, show_progress="hidden")
    package.change(choose_package, [ws, package], [download, contents, rank], api_visibility="private", **cheap)
    prepare.click(prepare_zip, [ws, package, rank], [download, contents], api_name="export", concurrency_limit=2,
                  concurrency_id="export", show_progress_on=[contents])
    # The token box is emptied after every push, successful or not, so it never lingers in the page
    # (`.then` does not run after a failed event, so both outcomes are listened to).
    pushing = push.click(push_to_hub, [ws, package, repo, private, token, rank], [pushed], api_name="push",
                         concurrency_limit=2, concurrency_id="push")
    for outcome in (pushing.success, pushing.failure):
        outcome(lambda: "", None, [token], api_visibility="private", **cheap)


def sign_section(studio: Studio, package: gr.Dropdown) -> None:
    """Sign a copy of the chosen package with a bit signature, or verify the chosen package's signature."""
    ws = studio.workspace
    with gr.Accordion("Sign with a MarkBoard signature", open=False):
        gr.Markdown("Writes your signature (up to 64 bits) into a copy of the package as extra LoRA branches, one "
                    "per bit, read back by querying its layers: it survives the zip, the Hub and the kohya files, "
                    "and the copy loads in diffusers as before. Signing a signed package swaps its branches for the "
                    "new signature. With a key, only its holder can read or change the signature.")
        with gr.Row():
            signature = gr.Textbox(label="Signature", placeholder="10110010", max_length=80, elem_id="sign-bits")
            key = gr.Textbox(label="Key (optional)", type="password", max_length=256, elem_id="sign-key",
                             placeholder="never stored; needed again to verify")
            copy_name = gr.Textbox(label="Signed copy", placeholder="<package>-signed", max_length=64)
        with gr.Row():
            sign = gr.Button("Sign a copy", elem_id="sign-run")
            verify = gr.Button("Verify", elem_id="sign-verify")
        signed = gr.Markdown(elem_id="sign-result")

    @handler
    def sign_copy(workspace_id, name, bits, secret, new_name):
        taken = studio.library(workspace_id).sign(name, bits or "", secret or "", (new_name or "").strip() or None)
        return f"Signed copy **{taken}** written with {len(parse_bits(bits or ''))} bits."

    @handler
    def verify_signature(workspace_id, name, secret):
        result = studio.library(workspace_id).verify(name, secret or "")
        return f"**{name}** carries the signature `{result.text}` ({len(result.bits)} bits)."

    sign.click(sign_copy, [ws, package, signature, key, copy_name], [signed], api_name="sign", concurrency_limit=2,
               concurrency_id="sign", show_progress_on=[signed])
    verify.click(verify_signature, [ws, package, key], [signed], api_name="verify", concurrency_limit=2,
                 concurrency_id="sign", show_progress_on=[signed])
