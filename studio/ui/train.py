"""The Train tab: one image in, a training job queued, its progress followed live until the package is ready.

The page keeps no job state of its own: a timer re-reads the job record, so a reload or a server restart
shows the job where it is (and an interrupted one offers to resume).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from pipelines.errors import BlockStudioError
from pipelines.images import center_crop_square, load_image
from pipelines.models import REGISTRY
from pipelines.package import AdapterPackage
from pipelines.settings import SettingField
from pipelines.storage import is_package
from studio.jobs import JobRecord
from studio.methods import ADAPTER_LABELS, METHODS, Method, models_for, training_defaults, unavailable
from studio.ui.common import STATUS_LABELS as COMMON_STATUS_LABELS
from studio.ui.common import (
    Studio,
    banner,
    format_seconds,
    handler,
    job_card,
    ops_note,
    queue_note,
    upload_path,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "assets" / "examples"
STATUS_LABELS = {**COMMON_STATUS_LABELS, "running": "Training"}
POLL_SECONDS = 1.0


@dataclass
class TrainTab:
    job: gr.Dropdown
    status_outputs: list
    load_job: Any


def model_choices(studio: Studio, arch: str) -> list[tuple[str, str]]:
    """Registry models of `arch`; without a GPU only the tiny ones (a real model would take hours on a CPU)."""
    return [(s.name, s.name) for s in models_for(arch) if studio.offers(s.name)]


def model_info(name: str | None) -> str:
    """The line under the base-model box: what the chosen model is (the box itself keeps to its name)."""
    spec = REGISTRY.get(name or "")
    return spec.description if spec else ""


def adapter_options(method: Method) -> dict[str, Any]:
    """The adapters `method` trains its blocks with (the Adapter radio's settings); shown only given a choice."""
    return dict(choices=[(ADAPTER_LABELS[a], a) for a in method.adapters], value=method.adapters[0],
                visible=len(method.adapters) > 1)


def setting_control(field: SettingField) -> gr.components.Component:
    """The form control of one of a recipe's own settings, from its metadata."""
    common = dict(label=field.form_label, info=field.help or None, elem_id=f"train-setting-{field.name}")
    if field.choices is not None:
        return gr.Dropdown(list(field.choices), value=field.default, **common)
    if field.kind in ("flag", "tristate"):
        return gr.Checkbox(value=bool(field.default), **common)
    if field.kind in ("int", "float"):
        return gr.Number(value=field.default, precision=0 if field.kind == "int" else None, minimum=field.minimum,
                         maximum=field.maximum, **common)
    return gr.Textbox(value=field.default, **common)


def remember_setting(method_key: str, name: str):
    """The event that keeps a recipe's own setting, as the page changes it, in the page's `own` state: {recipe:
    {setting: value}}. A state is no part of the API, so `/train` keeps its parameters whatever the recipes."""

    def remember(own: dict | None, value: Any) -> dict:
        own = dict(own or {})
        own[method_key] = {**own.get(method_key, {}), name: value}
        return own

    return remember


def _method_label(key: str) -> str:
    method = METHODS.get(key)
    return method.label if method is not None else key


def _job_label(record: JobRecord) -> str:
    when = time.strftime("%b %d %H:%M", time.localtime(record.created))
    adapter = record.settings.get("adapter") or "lora"
    kind = ADAPTER_LABELS.get(adapter, str(adapter)).split(" ")[0]
    method = _method_label(record.method) + (f" ({kind})" if adapter != "lora" else "")
    return f"{record.name} · {method} · {record.model} · {when}"


def job_choices(studio: Studio, owner: str) -> list[tuple[str, str]]:
    return [(_job_label(r), r.id) for r in studio.jobs.jobs(owner)]


def finishing(record: JobRecord) -> bool:
    """Every step is done but the job still runs: it is saving the package and rendering its samples."""
    return record.status == "running" and record.total > 0 and record.step >= record.total


def render_status(record: JobRecord | None, ahead: int | None, facts: str | None = None) -> str:
    """The job's card: status, progress, speed, ETA, loss and a note; `facts` is the line saying what serves
    the jobs and how busy it is."""
    if record is None:
        return ("<div class='bs-job bs-empty'>No training yet. Upload an image, check the crop, and press "
                "<b>Start training</b>. You can leave or reload the page: the job keeps going and shows up "
                f"here again.{ops_note(facts)}</div>")
    total = max(record.total, 1)
    percent = min(100.0, 100.0 * record.step / total)
    loss = f"{record.losses[-1]:.4f}" if record.losses else "–"
    # A queued job (a resumed one included) has no speed yet; what the record holds is its last run's.
    speed = f"{record.it_s:.2f} it/s" if record.it_s and record.status != "queued" else "– it/s"
    wrapping_up = finishing(record)
    label = "Finishing" if wrapping_up else STATUS_LABELS.get(record.status, record.status)
    eta = format_seconds(record.eta_s) if record.status == "running" and not wrapping_up else "–"
    note = None
    if record.status == "queued":
        note = queue_note(ahead)
    elif wrapping_up:
        note = f"All {record.total} steps done: saving the package and rendering its samples…"
    elif record.status == "cancelling":
        note = "Stopping after the current step and saving a checkpoint…"
    elif record.status == "done":
        note = (f"Package <b>{html.escape(record.name)}</b> is in your Library. Mix it, re-embed it, or share "
                "it from the other tabs.")
    elif record.resumable:
        where = (f"from its checkpoint at step {record.checkpoint_step}" if record.checkpoint_step
                 else "from the start" if record.restart else "from the start (no checkpoint was saved yet)")
        reason = f"{html.escape(record.error)}. " if record.error else ""
        note = f"{reason}Resume continues {where}."
    if record.resumed_from:
        note = (note + " " if note else "") + f"(Resumed from step {record.resumed_from}.)"
    stats = [f"Step <b>{record.step}</b> / {record.total}", speed, f"ETA {eta}", f"loss {loss}"]
    return job_card(record.status, label, record.name, f"{_method_label(record.method)} · {record.model}", percent,
                    stats, note, facts)


def _loss_frame(record: JobRecord | None) -> pd.DataFrame | None:
    """The loss curve; None (an empty plot) before the first step, as an empty table makes the chart library
    warn about infinite axis extents on every redraw."""
    losses = record.losses if record else []
    if not losses:
        return None
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses})


def _samples(studio: Studio, record: JobRecord | None) -> list[tuple[str, str]]:
    if record is None:
        return []
    items = []
    package = studio.workspace_of(record.owner).packages / record.name
    if record.status == "done" and is_package(package):
        method = METHODS.get(record.method)
        shown = [(s.stem, s.caption) for s in (method.samples if method is not None else ())]
        for stem, caption in (*shown, ("input", "trained crop")):
            if path := AdapterPackage(package, {}).sample(stem):
                items.append((str(path), caption))
    for name in reversed(record.samples):
        path = studio.jobs.job_file(record, f"samples/{name}")
        if path.is_file():
            items.append((str(path), f"preview at step {int(name[5:11])}"))
    return items


def status_values(studio: Studio, record: JobRecord | None, send_samples: bool = True,
                  send_losses: bool = True) -> tuple:
    """Everything the progress area shows, in the order of `TrainTab.status_outputs`."""
    ahead = studio.jobs.position(record.id) if record else None
    active = bool(record and record.active)
    resumable = bool(record and record.resumable)
    resume_label = (f"Resume from step {record.checkpoint_step}" if resumable and record.checkpoint_step
                    else "Start again")
    return (
        render_status(record, ahead, studio.jobs.facts().summary()),
        _loss_frame(record) if send_losses else gr.skip(),
        _samples(studio, record) if send_samples else gr.skip(),
        gr.Button(visible=active, interactive=bool(record and record.status in ("queued", "running"))),
        gr.Button(visible=resumable, value=resume_label),
        gr.Button(visible=resumable),
        record.public_dict() if record else {},
        gr.Timer(active=active),
    )


def build(studio: Studio) -> TrainTab:
    ws = studio.workspace
    methods = [(m.label, m.key) for m in METHODS.values()]
    first = METHODS[methods[0][1]]
    first_model = REGISTRY[studio.default_models[first.arch]]
    defaults = training_defaults(first, first_model)
    missing = unavailable()

    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            image = gr.Image(label="Your image", type="filepath", sources=["upload", "clipboard"], height=340,
                             elem_id="train-image", buttons=["fullscreen"],
                             placeholder="Drop an image here, paste one, or pick an example below")
            gr.Examples(examples=[[str(p)] for p in sorted(EXAMPLES.glob("*.jpg"))], inputs=[image],
                        label="Examples")
        with gr.Column(scale=4):
            method = gr.Radio(methods, value=first.key, label="Method", info=first.blurb + (
                f" {', '.join(missing)}: not installed in this build." if missing else ""))
            model = gr.Dropdown(model_choices(studio, first.arch), value=first_model.name, label="Base model",
                                info=model_info(first_model.name), elem_id="train-model")
            crop = gr.Image(label="What will be trained (centre crop)", interactive=False, height=200,
                            elem_id="train-crop", buttons=[])
            name = gr.Textbox(label="Package name", placeholder="from the image's file name",
                              max_length=64)
            with gr.Accordion("Training settings", open=False):
                with gr.Row():
                    steps = gr.Number(value=defaults["steps"], label="Steps", precision=0, minimum=1)
                    rank = gr.Dropdown([4, 8, 16, 32, 64, 128], value=defaults["rank"], label="LoRA rank")
                with gr.Row():
                    learning_rate = gr.Number(value=defaults["learning_rate"], label="Learning rate")
                    seed = gr.Number(value=defaults["seed"], label="Seed", precision=0, minimum=0)
                with gr.Row():
                    sample_every = gr.Number(value=defaults["sample_every"], label="Preview every N steps",
                                             info="0 = no previews while training", precision=0, minimum=0)
                    token = gr.Textbox(label="Trigger token", placeholder=first.token_hint, max_length=32,
                                       elem_id="train-token")
                adapter = gr.Radio(label="Adapter", elem_id="train-adapter", **adapter_options(first),
                                   info="DyLoRA and SoRA packages can be exported later at a smaller rank "
                                        "(Share tab, or blockstudio export)")
                # Each recipe's own settings, from its settings' metadata; shown while that recipe is chosen.
                own_groups, own_controls = {}, []
                for method_spec in METHODS.values():
                    fields = method_spec.form_fields()
                    if not fields:
                        continue
                    with gr.Accordion(f"{method_spec.name} settings", open=False,
                                      visible=method_spec.key == first.key,
                                      elem_id=f"train-settings-{method_spec.command}") as group:
                        for field in fields:
                            own_controls.append((method_spec.key, field.name, setting_control(field)))
                    own_groups[method_spec.key] = group
            start = gr.Button("Start training", variant="primary", size="lg", elem_id="train-start")

    gr.Markdown("### Progress")
    with gr.Row():
        job = gr.Dropdown(label="Job", choices=[], value=None, allow_custom_value=True, scale=4,
                          elem_id="train-job")
        cancel = gr.Button("Cancel", variant="stop", visible=False, scale=1, elem_id="train-cancel")
        resume = gr.Button("Resume", variant="primary", visible=False, scale=1, elem_id="train-resume")
        discard = gr.Button("Discard", visible=False, scale=1)
    status = gr.HTML(render_status(None, None), elem_id="train-status")
    with gr.Row():
        loss_plot = gr.LinePlot(_loss_frame(None), x="step", y="loss", title="Training loss", height=260,
                                scale=3, buttons=["fullscreen", "export"])
        samples = gr.Gallery(label="Previews", columns=3, height=260, scale=2, object_fit="contain",
                             fit_columns=False, buttons=["download", "fullscreen"], elem_id="train-samples")
    with gr.Accordion("Job record", open=False):
        details = gr.JSON(label="job.json")
    timer = gr.Timer(POLL_SECONDS, active=False)
    shown = gr.State(None)  # which previews this page already shows
    outputs = [status, loss_plot, samples, cancel, resume, discard, details, timer]

    @handler
    def change_method(key: str):
        chosen = METHODS[key]
        spec = REGISTRY[studio.default_models[chosen.arch]]
        values = training_defaults(chosen, spec)
        updates = (gr.Dropdown(choices=model_choices(studio, chosen.arch), value=spec.name, info=model_info(spec.name)),
                   gr.Radio(info=chosen.blurb), values["steps"], values["rank"], values["learning_rate"],
                   values["sample_every"], gr.Textbox(placeholder=chosen.token_hint),
                   gr.Radio(**adapter_options(chosen)),
                   *(gr.Accordion(visible=owner == key) for owner in own_groups))
        if studio.banner is None:
            return updates
        notice = banner(studio.gpu, spec.name)
        return updates + (gr.Markdown(notice[1]) if notice else gr.skip(),)

    @handler
    def crop_preview(upload, model_name: str | None):
        path = upload_path(upload)
        if not path or not model_name or model_name not in REGISTRY:
            return None
        spec = REGISTRY[model_name]
        square = center_crop_square(load_image(path), spec.resolution)
        if square.width < 256:  # tiny models train on 64 px: enlarge so the crop is visible
            square = square.resize((256, 256), Image.Resampling.NEAREST)
        return gr.Image(value=square, label=f"What will be trained: centre crop, {spec.resolution}×{spec.resolution} px")

    @handler
    def start_training(workspace_id, upload, method_key, model_name, package_name, n_steps, lora_rank, lr,
                       seed_value, preview_every, trigger, adapter_type="lora", own=None):
        path = upload_path(upload)
        if not path:
            raise gr.Error("Upload an image first (drag and drop, paste, or pick an example).",
                           print_exception=False)
        owner = studio.workspace_of(workspace_id).id
        record = studio.jobs.submit(
            owner, image=path, method=method_key, model=model_name, name=package_name or None,
            steps=n_steps or 0, rank=lora_rank or 0, learning_rate=lr or 0, seed=seed_value or 0,
            sample_every=preview_every or 0, token=trigger, adapter=adapter_type or "lora",
            options=(own or {}).get(method_key) if isinstance(own, dict) else None,
        )
        ahead = studio.jobs.position(record.id)
        gr.Info(f"{record.name}: queued" + (f" behind {ahead} job(s)." if ahead else ", starting now."))
        return (gr.Dropdown(choices=job_choices(studio, owner), value=record.id),) + status_values(studio, record)

    @handler
    def show_job(workspace_id, job_id):
        if not job_id:
            return status_values(studio, None)
        record = studio.jobs.get(studio.workspace_of(workspace_id).id, job_id)
        return status_values(studio, record)

    @handler
    def poll_job(workspace_id, job_id, shown):
        """The timer's view: like show_job, but previews and the loss curve are sent only when they changed."""
        if not job_id:
            return status_values(studio, None) + (None,)
        record = studio.jobs.get(studio.workspace_of(workspace_id).id, job_id)
        # Previews are whole images and the curve is redrawn on every update; sending them again every
        # second would cost each page bandwidth and redraws.
        key = [record.id, record.status, len(record.samples), len(record.losses)]
        before = shown if isinstance(shown, list) and len(shown) == len(key) else [None] * len(key)
        return status_values(studio, record, send_samples=key[:3] != before[:3],
                             send_losses=[key[0], key[3]] != [before[0], before[3]]) + (key,)

    @handler
    def cancel_job(workspace_id, job_id):
        record = studio.jobs.cancel(studio.workspace_of(workspace_id).id, job_id or "")
        return status_values(studio, record)

    @handler
    def resume_job(workspace_id, job_id):
        record = studio.jobs.resume(studio.workspace_of(workspace_id).id, job_id or "")
        return status_values(studio, record)

    @handler
    def discard_job(workspace_id, job_id):
        owner = studio.workspace_of(workspace_id).id
        studio.jobs.discard(owner, job_id or "")
        gr.Info("Discarded the job and its checkpoints.")
        return current_job(owner)

    def current_job(owner: str) -> tuple:
        """The job list with the job this workspace most wants to see (the running one, else the newest)."""
        record = studio.jobs.latest(owner)
        return (gr.Dropdown(choices=job_choices(studio, owner), value=record.id if record else None),
                ) + status_values(studio, record)

    @handler
    def load_job(workspace_id):
        """On page load: the job this workspace most wants to see (the running one, else the newest)."""
        try:
            owner = studio.workspace_of(workspace_id).id
        except BlockStudioError:
            return (gr.Dropdown(choices=[], value=None),) + status_values(studio, None)
        return current_job(owner)

    cheap = dict(concurrency_limit=None, show_progress="hidden")
    method_outputs = [model, method, steps, rank, learning_rate, sample_every, token, adapter, *own_groups.values()]
    if studio.banner is not None:
        method_outputs.append(studio.banner)  # it names the tiny model the chosen method trains on
    method.input(change_method, [method], method_outputs, api_visibility="private", **cheap)
    model.input(lambda name: gr.Dropdown(info=model_info(name)), [model], [model], api_visibility="private", **cheap)
    # preprocess=False: the handlers check uploads themselves (see upload_path).
    gr.on([image.change, model.change], crop_preview, [image, model], [crop], api_name="crop_preview",
          preprocess=False, **cheap)
    own = gr.State({})  # the recipes' own settings as this page set them (see `remember_setting`)
    for key, setting_name, control in own_controls:
        control.change(remember_setting(key, setting_name), [own, control], [own], api_visibility="private", **cheap)
    start.click(start_training, [ws, image, method, model, name, steps, rank, learning_rate, seed, sample_every,
                                 token, adapter, own], [job] + outputs, api_name="train", concurrency_limit=None, preprocess=False,
                show_progress="hidden")
    job.input(show_job, [ws, job], outputs, api_visibility="private", **cheap)
    timer.tick(poll_job, [ws, job, shown], outputs + [shown], api_name="job_status", **cheap)
    cancel.click(cancel_job, [ws, job], outputs, api_name="cancel", **cheap)
    resume.click(resume_job, [ws, job], outputs, api_name="resume", **cheap)
    discard.click(discard_job, [ws, job], [job] + outputs, api_name="discard", **cheap)
    return TrainTab(job=job, status_outputs=outputs, load_job=load_job)
