"""Driving a lab panel through the app's API, as the page does: for every method's app-client test.

    outputs = run_panel(client, workspace, "lora", EXPERIMENTS["lora"].settings_cls.quick())
    assert record_of(outputs)["status"] == "done" and len(figures_of(outputs)) == 3
"""

from __future__ import annotations

import time

from studio.ui.lab._panel import api_key, ordered_fields


def form_values(settings) -> list:
    """The panel's inputs for `settings`, in the form's order, as the page sends them."""
    return [list(v) if isinstance(v := getattr(settings, spec.name), tuple) else v
            for spec in ordered_fields(type(settings))]


def record_of(outputs) -> dict:
    """The lab job's record among a panel endpoint's outputs."""
    return next(o for o in outputs if isinstance(o, dict) and o.get("kind") == "lab")


def figures_of(outputs) -> list[str]:
    """The figure files a panel endpoint shows (in the figure slots, in order)."""
    return [o["value"] for o in outputs if isinstance(o, dict) and str(o.get("value", "")).endswith(".png")]


def tables_of(outputs) -> list[dict]:
    """The tables shown, each as gradio_client returns a Dataframe (`headers`, `data`)."""
    return [o["value"] for o in outputs
            if isinstance(o, dict) and isinstance(o.get("value"), dict) and "headers" in o["value"]]


def start_panel(client, workspace: str, method: str, settings) -> str:
    """Press Run with `settings`; return the job id."""
    return client.predict(workspace, *form_values(settings), api_name=f"/lab_{api_key(method)}_run")[0]


def poll_until_stopped(client, workspace: str, method: str, job_id: str, timeout: float = 300.0) -> tuple:
    """Poll the panel as its timer does until the run stops; return the last outputs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outputs = client.predict(workspace, job_id, api_name=f"/lab_{api_key(method)}_status")
        if record_of(outputs)["status"] not in ("queued", "running", "cancelling"):
            return outputs
        time.sleep(0.2)
    raise TimeoutError(f"lab job {job_id} did not finish in {timeout}s")


def run_panel(client, workspace: str, method: str, settings, timeout: float = 300.0) -> tuple:
    """Run `method`'s panel with `settings` to the end; return the outputs the page shows then."""
    return poll_until_stopped(client, workspace, method, start_panel(client, workspace, method, settings), timeout)
