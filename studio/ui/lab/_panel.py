"""The generic lab panel: a settings form built from an experiment's settings dataclass, Run through the job
queue with progress and Cancel, and the result as a summary, figures and tables.

Every handler is a module-level function taking the studio and the method first (the panel binds them), so
each can be called alone. A run's state lives in its job record, not in the page: opening the panel shows the
workspace's newest run of the method again, finished or not.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from pipelines.adapters import METHODS
from pipelines.errors import BlockStudioError
from pipelines.lab import LabResult
from pipelines.lab.experiment import SettingField
from studio.jobs import JobRecord
from studio.ui.common import STATUS_LABELS, Studio, format_seconds, handler, job_card, ops_note, queue_note

MAX_FIGURES = 6
MAX_TABLES = 3
POLL_SECONDS = 1.0
SLIDER_SPAN = 512  # whole-number fields with a range at most this wide get a slider
BASE_FIELDS = ("seed", "model_id")


def api_key(method: str) -> str:
    """The method's name as it appears in the panel's API names (`/lab_<key>_run`)."""
    return method.replace("-", "_")


# -- the form ------------------------------------------------------------------------------------------------


def ordered_fields(settings_cls) -> list[SettingField]:
    """The experiment's own fields first, then the seed and the Hub model every experiment has."""
    specs = settings_cls.setting_fields()
    return [s for s in specs if s.name not in BASE_FIELDS] + [s for s in specs if s.name in BASE_FIELDS]


def component_for(spec: SettingField) -> gr.components.Component:
    """The form control of one setting: a checkbox, a (multi-select) dropdown, a slider, a number or a text box."""
    common = dict(label=spec.label, info=spec.help or None, elem_id=None)
    if spec.kind is bool:
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind is tuple:
        if spec.choices is not None:
            return gr.Dropdown(choices=list(spec.choices), value=list(spec.default or ()), multiselect=True, **common)
        return gr.Textbox(value=", ".join(map(str, spec.default or ())), max_lines=1,
                          placeholder="values separated by commas", **common)
    if spec.choices is not None:
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind is str:
        return gr.Textbox(value=spec.default, max_lines=1, max_length=200, **common)
    bounded = spec.minimum is not None and spec.maximum is not None
    slider = spec.widget == "slider" or (
        spec.widget is None and spec.kind is int and bounded and spec.maximum - spec.minimum <= SLIDER_SPAN)
    if slider and bounded:
        step = 1 if spec.kind is int else (spec.maximum - spec.minimum) / 100
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, step=step, value=spec.default, **common)
    return gr.Number(value=spec.default, precision=0 if spec.kind is int else None, **common)


def settings_of(settings_cls, values: tuple) -> dict[str, Any]:
    """The form's values by field name (checked later, by the job queue, against the settings class)."""
    specs = ordered_fields(settings_cls)
    if len(values) != len(specs):
        raise ValueError(f"expected {len(specs)} settings, got {len(values)}")
    return {spec.name: value for spec, value in zip(specs, values, strict=True)}


# -- what the page shows -------------------------------------------------------------------------------------


def render_status(record: JobRecord | None, ahead: int | None, facts: str | None = None) -> str:
    """The run's card; `facts` is the line saying what serves the jobs and how busy it is."""
    if record is None:
        return ("<div class='bs-job bs-empty'>No run yet. Choose the settings and press <b>Run</b>; the run goes "
                f"through the studio's job queue, and you can leave or reload the page while it runs.{ops_note(facts)}"
                "</div>")
    percent = 100.0 * min(1.0, max(0.0, record.fraction))
    eta = format_seconds(record.eta_s) if record.status == "running" else "–"
    note = None
    if record.status == "queued":
        note = queue_note(ahead)
    elif record.status == "cancelling":
        note = "Stopping at the run's next progress report…"
    elif record.status in ("failed", "interrupted", "cancelled"):
        note = (f"{html.escape(record.error)}. " if record.error else "") + "Press Run to start it again."
    stats = [f"<b>{percent:.0f}%</b>", html.escape(record.message or ""),
             f"elapsed {format_seconds(record.elapsed_s)}", f"ETA {eta}"]
    return job_card(record.status, STATUS_LABELS.get(record.status, record.status), _title(record.method),
                    record.model, percent, stats, note, facts)


def _title(method: str) -> str:
    info = METHODS.get(method)
    return info.title if info else method


def result_values(studio: Studio, record: JobRecord | None) -> list:
    """The summary, the figure slots and the table slots for a record (empty and hidden unless it is done)."""
    folder = studio.jobs.lab_result_folder(record) if record is not None and record.status == "done" else None
    if folder is None:
        return ([gr.Markdown(value="", visible=False)] + [gr.Image(value=None, visible=False)] * MAX_FIGURES
                + [gr.Dataframe(value=None, visible=False)] * MAX_TABLES)
    result = LabResult.load(folder, figures=False)
    figures = list(result.figure_paths.items())
    tables = list(result.tables.items())
    summary = result.summary
    extra = len(figures) - MAX_FIGURES, len(tables) - MAX_TABLES
    if extra[0] > 0 or extra[1] > 0:
        summary += f"\n\n(The result folder holds {max(extra[0], 0)} more figures and {max(extra[1], 0)} more tables.)"
    images = [gr.Image(value=str(path), label=name.replace("_", " "), visible=True) for name, path in figures]
    frames = [gr.Dataframe(value=pd.DataFrame(rows), label=name.replace("_", " "), visible=True)
              for name, rows in tables]
    images += [gr.Image(value=None, visible=False)] * (MAX_FIGURES - len(images))
    frames += [gr.Dataframe(value=None, visible=False)] * (MAX_TABLES - len(frames))
    return [gr.Markdown(value=summary, visible=True)] + images[:MAX_FIGURES] + frames[:MAX_TABLES]


def panel_values(studio: Studio, record: JobRecord | None, send_result: bool = True) -> tuple:
    """Everything the panel shows, in the order of `LabPanel.outputs`."""
    ahead = studio.jobs.position(record.id) if record is not None else None
    active = bool(record and record.active)
    result = result_values(studio, record) if send_result else [gr.skip()] * (1 + MAX_FIGURES + MAX_TABLES)
    return (
        render_status(record, ahead, studio.jobs.facts().summary()),
        gr.Button(visible=active, interactive=bool(record and record.status in ("queued", "running"))),
        *result,
        record.public_dict() if record is not None else {},
        gr.Timer(active=active),
    )


def _shown_key(record: JobRecord | None) -> list | None:
    return [record.id, record.status] if record is not None else None


# -- handlers -------------------------------------------------------------------------------------------------


def start_run(studio: Studio, method: str, workspace_id: str | None, *values: Any) -> tuple:
    """Run: check the settings, queue the job, and show it (a bad setting: one line naming the field)."""
    from pipelines.lab import experiment_for

    owner = studio.workspace_of(workspace_id).id
    settings = settings_of(experiment_for(method).settings_cls, values)
    record = studio.jobs.submit_lab(owner, method, settings)
    return (record.id, *panel_values(studio, record), _shown_key(record))


def poll_run(studio: Studio, method: str, workspace_id: str | None, job_id: str | None, shown: list | None) -> tuple:
    """The timer's view of the run: the result is sent once, when the run's state changes."""
    record = _record(studio, method, workspace_id, job_id)
    key = _shown_key(record)
    return (*panel_values(studio, record, send_result=key != shown), key)


def cancel_run(studio: Studio, method: str, workspace_id: str | None, job_id: str | None) -> tuple:
    record = studio.jobs.cancel(studio.workspace_of(workspace_id).id, job_id or "")
    return (*panel_values(studio, record), _shown_key(record))


def show_latest(studio: Studio, method: str, workspace_id: str | None) -> tuple:
    """On opening the panel: the workspace's newest run of this method (an active one first)."""
    try:
        owner = studio.workspace_of(workspace_id).id
    except BlockStudioError:  # the page has not got its workspace yet
        return (None, *panel_values(studio, None), None)
    record = studio.jobs.latest(owner, kind="lab", method=method)
    return (record.id if record else None, *panel_values(studio, record), _shown_key(record))


def _record(studio: Studio, method: str, workspace_id: str | None, job_id: str | None) -> JobRecord | None:
    if not job_id:
        return None
    record = studio.jobs.get(studio.workspace_of(workspace_id).id, job_id)
    if record.kind != "lab" or record.method != method:
        raise ValueError("that job is not a run of this panel's method")
    return record


# -- the panel ------------------------------------------------------------------------------------------------


@dataclass
class LabPanel:
    method: str
    inputs: list
    outputs: list
    run: gr.Button
    cancel: gr.Button


def build(studio: Studio, experiment, tab: gr.Tab | None = None) -> LabPanel:
    """The panel of one experiment, built inside the caller's layout (the tab the lab opened for it)."""
    method = experiment.method
    info = METHODS[method]
    key = api_key(method)
    available, why = info.available()
    gr.Markdown(f"**{info.title}** · {info.paper}\n\n{experiment.description}\n\n*What it shows:* {info.property}")
    if not available:
        gr.Markdown(f"**Unavailable here:** {why}.", elem_id=f"lab-{key}-unavailable")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            specs = ordered_fields(experiment.settings_cls)
            own = [s for s in specs if s.name not in BASE_FIELDS]
            base = [s for s in specs if s.name in BASE_FIELDS]
            inputs = [component_for(s) for s in own]
            with gr.Accordion("Seed and model", open=False):
                inputs += [component_for(s) for s in base]
            with gr.Row():
                run = gr.Button("Run", variant="primary", interactive=available, elem_id=f"lab-{key}-run")
                cancel = gr.Button("Cancel", variant="stop", visible=False, elem_id=f"lab-{key}-cancel")
        with gr.Column(scale=3):
            status = gr.HTML(render_status(None, None), elem_id=f"lab-{key}-status")
            summary = gr.Markdown(visible=False)
            images = []
            for start in range(0, MAX_FIGURES, 2):
                with gr.Row():
                    # No label badge: it would cover the figure's own title.
                    images += [gr.Image(visible=False, interactive=False, type="filepath", show_label=False,
                                        buttons=["fullscreen", "download"])
                               for _ in range(start, min(start + 2, MAX_FIGURES))]
            tables = [gr.Dataframe(visible=False, interactive=False, wrap=True) for _ in range(MAX_TABLES)]
            with gr.Accordion("Job record", open=False):
                details = gr.JSON(label="job.json")
    job = gr.Textbox(visible=False, elem_id=f"lab-{key}-job")  # the run shown (a component, so the API can name it)
    shown = gr.State(None)
    timer = gr.Timer(POLL_SECONDS, active=False)
    outputs = [status, cancel, summary, *images, *tables, details, timer]

    bind = functools.partial
    cheap = dict(concurrency_limit=None, show_progress="hidden")
    # preprocess=False: the settings arrive as sent and are checked (with messages naming the field) by the lab.
    run.click(handler(bind(start_run, studio, method)), [studio.workspace, *inputs], [job, *outputs, shown],
              api_name=f"lab_{key}_run", preprocess=False, **cheap)
    timer.tick(handler(bind(poll_run, studio, method)), [studio.workspace, job, shown], [*outputs, shown],
               api_name=f"lab_{key}_status", **cheap)
    cancel.click(handler(bind(cancel_run, studio, method)), [studio.workspace, job], [*outputs, shown],
                 api_name=f"lab_{key}_cancel", **cheap)
    if tab is not None:
        tab.select(handler(bind(show_latest, studio, method)), [studio.workspace], [job, *outputs, shown],
                   api_name=f"lab_{key}_latest", **cheap)
    return LabPanel(method=method, inputs=inputs, outputs=outputs, run=run, cancel=cancel)
