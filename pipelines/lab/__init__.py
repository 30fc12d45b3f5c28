"""The adapter lab: one small, seeded, offline experiment per adapter method, with tables and figures.

    from pipelines.lab import EXPERIMENTS, run_experiment
    result = run_experiment("lora", {"ranks": "1, 4"})      # settings: None, a dict of UI/CLI values, or LabSettings
    result.save("out/lora")                                 # result.json + one PNG per figure

An experiment lives in `pipelines/lab/experiments/<method>.py` and calls `register_experiment` at import;
importing this package imports every module there. Experiments use only the public adapter verbs of
`pipelines.adapters` on the tiny backbones of `pipelines.lab.models`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import random

from pipelines.lab.experiment import (
    Experiment,
    LabCancelled,
    LabError,
    LabResult,
    LabSettings,
    LabSettingsError,
    Progress,
    SettingField,
    settings_from_dict,
)

log = logging.getLogger(__name__)

EXPERIMENTS: dict[str, Experiment] = {}
BROKEN: dict[str, str] = {}  # experiment module -> why it failed to import (shown by the lab's overview)


def register_experiment(experiment: Experiment) -> Experiment:
    """Add an experiment for a registered adapter method. Called once, at the bottom of its module."""
    from pipelines.adapters import METHODS

    if not isinstance(experiment, Experiment):
        raise TypeError(f"register_experiment takes an Experiment, not {type(experiment).__name__}")
    if experiment.method not in METHODS:
        raise ValueError(f"experiment for {experiment.method!r}: no adapter method of that name is registered")
    if not (isinstance(experiment.settings_cls, type) and issubclass(experiment.settings_cls, LabSettings)):
        raise TypeError(f"experiment for {experiment.method!r}: settings_cls must subclass LabSettings")
    experiment.settings_cls.setting_fields()  # a field type no form can show fails here, not in the page
    known = EXPERIMENTS.get(experiment.method)
    if known is not None and known.run is not experiment.run:
        raise ValueError(f"an experiment for {experiment.method!r} is registered already")
    EXPERIMENTS[experiment.method] = experiment
    return experiment


def experiment_for(method: str) -> Experiment:
    """The experiment of `method`, or one line saying which methods have one."""
    if not isinstance(method, str) or method not in EXPERIMENTS:
        known = ", ".join(sorted(EXPERIMENTS)) or "none"
        raise LabError(f"no lab experiment for {method!r} (experiments: {known})")
    return EXPERIMENTS[method]


def check_available(method: str) -> None:
    """Raise LabError saying why `method` cannot run here (a missing optional package)."""
    from pipelines.adapters import METHODS

    ok, why = METHODS[method].available()
    if not ok:
        raise LabError(why)


def make_settings(method: str, settings: None | dict | LabSettings = None) -> LabSettings:
    """Checked settings for `method`'s experiment from None (the defaults), UI/CLI values, or LabSettings."""
    experiment = experiment_for(method)
    if settings is None:
        return experiment.settings_cls()
    if isinstance(settings, dict):
        return settings_from_dict(experiment.settings_cls, settings)
    if not isinstance(settings, experiment.settings_cls):
        raise LabSettingsError(f"{method} takes {experiment.settings_cls.__name__}, not {type(settings).__name__}")
    settings.validate()
    return settings


def run_experiment(method: str, settings: None | dict | LabSettings = None,
                   progress: Progress | None = None) -> LabResult:
    """Run `method`'s experiment with checked settings; the global random generators are seeded first."""
    import numpy as np
    import torch

    experiment = experiment_for(method)
    check_available(method)
    settings = make_settings(method, settings)
    progress = progress or Progress()
    random.seed(settings.seed)
    np.random.seed(settings.seed % 2**32)
    torch.manual_seed(settings.seed)
    progress.update(0.0, "starting")
    result = experiment.run(settings, progress)
    if not isinstance(result, LabResult):
        raise TypeError(f"the {method} experiment returned {type(result).__name__}, not a LabResult")
    result.method = method
    if not result.settings:
        result.settings = settings.to_dict()
    progress.update(1.0, "done")
    return result


def discover() -> dict[str, Experiment]:
    """Import every module of `pipelines.lab.experiments` (each registers its experiment); a broken one is
    logged, listed in BROKEN, and left out."""
    from pipelines.lab import experiments

    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{experiments.__name__}.{info.name}")
            BROKEN.pop(info.name, None)
        except Exception as exc:
            log.exception("lab experiment %s failed to import; it is left out", info.name)
            BROKEN[info.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return EXPERIMENTS


__all__ = [
    "BROKEN",
    "EXPERIMENTS",
    "Experiment",
    "LabCancelled",
    "LabError",
    "LabResult",
    "LabSettings",
    "LabSettingsError",
    "Progress",
    "SettingField",
    "check_available",
    "discover",
    "experiment_for",
    "make_settings",
    "register_experiment",
    "run_experiment",
    "settings_from_dict",
]

discover()
