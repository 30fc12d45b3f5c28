"""A stand-in lab experiment for the job, app and CLI tests: it reports progress, waits at a gate, fails on
request, and returns a small result with a figure and a table, in milliseconds."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pipelines.lab import Experiment, LabResult, LabSettings, Progress
from pipelines.lab.plots import line_plot


@dataclass
class GateSettings(LabSettings):
    steps: int = field(default=5, metadata={"help": "progress reports", "min": 1, "max": 100})
    fail: bool = field(default=False, metadata={"help": "raise an error half way"})
    wait: bool = field(default=False, metadata={"help": "wait at the gate after the first report"})


class GatedExperiment:
    """Counts its runs; with `wait` it reports, then waits at `gate` while reporting every few milliseconds."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.runs = 0

    def __call__(self, settings: GateSettings, progress: Progress) -> LabResult:
        self.runs += 1
        for step in range(settings.steps):
            progress.update(step / settings.steps, f"step {step + 1}/{settings.steps}")
            self.started.set()
            while settings.wait and not self.gate.wait(0.005):
                progress.update(step / settings.steps, "waiting at the gate")
            if settings.fail and step >= settings.steps // 2:
                raise RuntimeError("the experiment broke on purpose\nsecond line of detail")
        xs = list(range(1, settings.steps + 1))
        return LabResult(method="lora", summary=f"ran {settings.steps} steps", metrics={"steps": settings.steps},
                         tables={"steps": [{"step": x, "value": x * x} for x in xs]},
                         figures={"squares": line_plot({"x squared": (xs, [x * x for x in xs])}, title="Squares",
                                                       xlabel="x", ylabel="x squared")})

    def experiment(self) -> Experiment:
        return Experiment(method="lora", settings_cls=GateSettings, run=self, description="a stand-in")


def install(monkeypatch) -> GatedExperiment:
    """Put the stand-in in place of the lora experiment for one test."""
    from pipelines.lab import EXPERIMENTS

    fake = GatedExperiment()
    monkeypatch.setitem(EXPERIMENTS, "lora", fake.experiment())
    return fake
