"""What every lab experiment shares: its settings (checked against their metadata), progress, and the result.

An experiment is a function `run(settings, progress) -> LabResult` with a settings dataclass. The settings carry
their own form: each field's metadata gives its help text, a short label, its range or its choices, and the
studio's panel and the CLI are generated from them. `Progress.update` is where a run reports how far it is and
where a cancel request stops it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import BlockStudioError
from pipelines.storage import atomic_dir
from pipelines.training import CancelToken, TrainingCancelled

RESULT_FILE = "result.json"
RESULT_FORMAT = "blockstudio-lab-result"
RESULT_VERSION = 1
MAX_RESULT_BYTES = 16 << 20
MAX_TUPLE_LENGTH = 32
MAX_TEXT_LENGTH = 200
_FIGURE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


class LabError(BlockStudioError):
    """A lab request that cannot run: an unknown or unavailable method, a result folder that does not fit."""


class LabSettingsError(LabError):
    """An experiment setting of the wrong type or out of its range; the message names the field."""


class LabCancelled(TrainingCancelled):
    """Raised by `Progress.update` once the run was asked to stop."""


# -- settings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingField:
    """One field of a settings dataclass as a form sees it: its kind and its metadata."""

    name: str
    kind: type  # int, float, bool, str or tuple
    item: type | None  # the element type of a tuple field
    default: Any
    help: str
    label: str
    minimum: float | None
    maximum: float | None
    choices: tuple | None
    widget: str | None  # "slider" or "number" to choose the form control of a number


_KINDS = {int, float, bool, str}


_FIELDS: dict[type, list[SettingField]] = {}


def read_fields(settings_cls: type[LabSettings]) -> list[SettingField]:
    """The fields of a settings class in declaration order; a TypeError for a type the form cannot show."""
    hints = typing.get_type_hints(settings_cls)
    out = []
    for f in dataclasses.fields(settings_cls):
        kind, item = _kind_of(hints[f.name], f.name, settings_cls)
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        choices = tuple(meta["choices"]) if meta.get("choices") is not None else None
        out.append(SettingField(
            name=f.name, kind=kind, item=item, default=default, help=str(meta.get("help", "")),
            label=str(meta.get("label") or f.name.replace("_", " ").capitalize()),
            minimum=meta.get("min"), maximum=meta.get("max"), choices=choices, widget=meta.get("widget"),
        ))
    return out


def _kind_of(hint: Any, name: str, owner: type) -> tuple[type, type | None]:
    if hint in _KINDS:
        return hint, None
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            return tuple, args[0]
    raise TypeError(f"{owner.__name__}.{name}: lab settings may be int, float, bool, str or tuple[int | float | "
                    f"str, ...], not {hint}")


@dataclass
class LabSettings:
    """The base of every experiment's settings: a seed, and a Hub model to use instead of the built-in one.

    Settings are checked when made (`__post_init__` calls `validate`); a subclass that checks more overrides
    `validate` and calls `super().validate()` first.

    Metadata keys of a field: `help` (a sentence), `label` (a short UI label), `min` / `max` (numbers, and every
    element of a tuple), `choices` (the allowed values, or allowed elements of a tuple), `widget` ("slider" or
    "number", optional). The defaults are the panel's full demo; `quick()` gives settings that run in seconds.
    """

    seed: int = field(default=0, metadata={"help": "seed of every random choice of the run", "label": "Seed",
                                           "min": 0, "max": 2**31 - 1})
    model_id: str = field(default="", metadata={
        "help": "a Hugging Face Hub model id to use instead of the built-in tiny model (used when it is cached, "
                "or the network is on)", "label": "Hub model (optional)"})

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def setting_fields(cls) -> list[SettingField]:
        """The fields as a form sees them (see `SettingField`), in declaration order."""
        if cls not in _FIELDS:
            _FIELDS[cls] = read_fields(cls)
        return _FIELDS[cls]

    @classmethod
    def quick(cls) -> LabSettings:
        """Settings for tests: a few seconds on two CPU cores. Experiments override this."""
        return cls()

    def validate(self) -> None:
        """Check every field against its type and metadata; subclasses call this first, then check more."""
        for spec in self.setting_fields():
            _check_value(spec, getattr(self, spec.name))
        if self.model_id and not _HUB_ID_RE.fullmatch(self.model_id):
            raise LabSettingsError(f"model_id {self.model_id!r} is not a Hub id (owner/name); leave it empty for "
                                   "the built-in tiny model")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def _show(value: Any) -> str:
    """A value as a message quotes it: its repr, cut short (a request may send anything, of any size)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _describe_range(spec: SettingField) -> str:
    if spec.minimum is not None and spec.maximum is not None:
        return f"between {_number(spec.minimum)} and {_number(spec.maximum)}"
    if spec.minimum is not None:
        return f"at least {_number(spec.minimum)}"
    return f"at most {_number(spec.maximum)}"


def _check_number(spec: SettingField, value: Any, kind: type, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise LabSettingsError(f"{what} must be {'a whole number' if kind is int else 'a number'}, not {_show(value)}")
    if not math.isfinite(value):
        raise LabSettingsError(f"{what} must be a finite number, not {_show(value)}")
    if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
        raise LabSettingsError(f"{what} must be {_describe_range(spec)}, not {_show(value)}")


def _check_scalar(spec: SettingField, value: Any, kind: type, what: str) -> None:
    if kind is bool:
        if not isinstance(value, bool):
            raise LabSettingsError(f"{what} must be true or false, not {_show(value)}")
    elif kind is str:
        if not isinstance(value, str):
            raise LabSettingsError(f"{what} must be text, not {_show(value)}")
        if len(value) > MAX_TEXT_LENGTH or any(ord(c) < 32 for c in value):
            raise LabSettingsError(f"{what} must be one line of at most {MAX_TEXT_LENGTH} characters")
    else:
        _check_number(spec, value, kind, what)
    if spec.choices is not None and value not in spec.choices:
        raise LabSettingsError(f"{what} must be one of {', '.join(map(str, spec.choices))}, not {_show(value)}")


def _check_value(spec: SettingField, value: Any) -> None:
    if spec.kind is not tuple:
        _check_scalar(spec, value, spec.kind, spec.name)
        return
    if not isinstance(value, tuple):
        raise LabSettingsError(f"{spec.name} must be a list of values, not {_show(value)}")
    if not 1 <= len(value) <= MAX_TUPLE_LENGTH:
        raise LabSettingsError(f"{spec.name} must hold between 1 and {MAX_TUPLE_LENGTH} values, not {len(value)}")
    for item in value:
        _check_scalar(spec, item, spec.item, f"each value of {spec.name}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce_scalar(value: Any, kind: type, what: str) -> Any:
    """A UI or CLI value as `kind`; anything that is not cleanly one is refused (checked again by validate)."""
    if value is None:
        raise LabSettingsError(f"{what} needs a value")
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        return value
    if kind is str:
        return value
    if isinstance(value, bool):
        return value  # refused by the check: a checkbox is not a number
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text) if kind is float or not re.fullmatch(r"[+-]?\d+", text) else int(text)
        except ValueError:
            raise LabSettingsError(f"{what} must be {'a whole number' if kind is int else 'a number'}, "
                                   f"not {_show(value)}") from None
        value = number
    if kind is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int):
        return float(value)
    return value


def _coerce(spec: SettingField, value: Any) -> Any:
    if spec.kind is not tuple:
        return _coerce_scalar(value, spec.kind, spec.name)
    if isinstance(value, str):
        text = value.strip()
        if len(text) >= 2 and text[0] + text[-1] in ("()", "[]"):
            text = text[1:-1]
        value = [part for part in (p.strip() for p in text.split(",")) if part]
    if not isinstance(value, (list, tuple)):
        raise LabSettingsError(f"{spec.name} must be a list of values such as 1, 2, 4, not {_show(value)}")
    if len(value) > MAX_TUPLE_LENGTH:
        raise LabSettingsError(f"{spec.name} must hold between 1 and {MAX_TUPLE_LENGTH} values, not {len(value)}")
    return tuple(_coerce_scalar(v, spec.item, f"each value of {spec.name}") for v in value)


def settings_from_dict(settings_cls: type[LabSettings], data: dict[str, Any] | None) -> LabSettings:
    """Settings from UI or CLI values: strings and numbers are coerced to each field's type, unknown fields are
    refused, missing ones take their defaults, and the result is validated (LabSettingsError naming the field)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LabSettingsError(f"settings must be a mapping of field names to values, not {type(data).__name__}")
    specs = {spec.name: spec for spec in settings_cls.setting_fields()}
    unknown = sorted(str(k) for k in data if k not in specs)
    if unknown:
        raise LabSettingsError(f"unknown setting {unknown[0]!r} (known: {', '.join(specs)})")
    values = {name: _coerce(specs[name], value) for name, value in data.items()}
    try:
        return settings_cls(**values)
    except TypeError as exc:  # a subclass whose __init__ refuses something: still one line
        raise LabSettingsError(str(exc)) from None


# -- progress -----------------------------------------------------------------------------------------------


ProgressCallback = Callable[[float, str], None]


class Progress:
    """How far a run is (a fraction in [0, 1] and a message), and the place where a cancel request stops it.

    `update` raises `LabCancelled` once `cancel` is set, and calls `callback(fraction, message)`: at most every
    `interval` seconds, and always for the last report (fraction 1) and for a new message at the fraction last
    reported (a new phase, such as loading, that has not moved the fraction yet). `span(start, end)` gives a
    Progress for one part of the run whose own 0..1 covers start..end of this one.
    """

    def __init__(self, callback: ProgressCallback | None = None, cancel: CancelToken | None = None, *,
                 interval: float = 0.1) -> None:
        self.callback = callback
        self.cancel = cancel
        self.interval = interval
        self.fraction = 0.0
        self.message = ""
        self._reported: tuple[float, float, str] | None = None  # (time, fraction, message) of the last callback
        self._start, self._end, self._parent = 0.0, 1.0, None

    @property
    def cancelled(self) -> bool:
        token = self._root().cancel
        return token is not None and token.cancelled

    def _root(self) -> Progress:
        return self if self._parent is None else self._parent._root()

    def update(self, fraction: float, message: str = "") -> None:
        fraction = float(fraction)
        fraction = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
        if self._parent is not None:
            self._parent.update(self._start + (self._end - self._start) * fraction, message)
            return
        self.fraction, self.message = fraction, message
        now = time.monotonic()
        last = self._reported
        due = (last is None or fraction >= 1.0 or now - last[0] >= self.interval
               or (message != last[2] and fraction == last[1]))
        if self.callback is not None and due:
            self._reported = (now, fraction, message)
            self.callback(fraction, message)
        if self.cancelled:
            raise LabCancelled(f"cancelled at {100 * fraction:.0f}%")

    def span(self, start: float, end: float) -> Progress:
        child = Progress(interval=self.interval)
        child._parent, child._start, child._end = self, float(start), float(end)
        return child


# -- results ------------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """A JSON value from numbers, text, bools, None, lists and str-keyed dicts (numpy and torch scalars too)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} is not a number, text or list")


@dataclass
class LabResult:
    """What a run shows: a summary in words, the numbers, tables of rows and figures drawn from the numbers.

    `save(folder)` writes `result.json` and one PNG per figure (`<name>.png`), all at once; `load(folder)` reads
    them back, with each figure as a Figure showing its PNG. `figure_paths` names the PNGs once saved or loaded.
    """

    method: str
    summary: str
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib.figure.Figure
    settings: dict[str, Any] = field(default_factory=dict)
    figure_paths: dict[str, Path] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        for name in self.figures:
            if not isinstance(name, str) or not _FIGURE_NAME_RE.fullmatch(name):
                raise ValueError(f"figure name {name!r} must be 1-64 lower-case letters, digits, '-' or '_'")
        metrics = {}
        for key, value in self.metrics.items():
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"metric {key!r} is {number}; metrics must be finite numbers")
            metrics[str(key)] = number
        tables = {str(name): [_plain(dict(row), f"table {name!r}") for row in rows]
                  for name, rows in self.tables.items()}
        return {"format": RESULT_FORMAT, "version": RESULT_VERSION, "method": self.method, "summary": self.summary,
                "metrics": metrics, "tables": tables, "figures": list(self.figures),
                "settings": _plain(self.settings, "settings")}

    def save(self, folder: str | Path) -> Path:
        """Write the result folder atomically (an older one at `folder` is replaced only once this is complete)."""
        folder = Path(folder)
        data = self.to_json()
        with atomic_dir(folder) as staging:
            for name, figure in self.figures.items():
                figure.savefig(staging / f"{name}.png", format="png", dpi=figure.dpi)
            (staging / RESULT_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        self.figure_paths = {name: folder / f"{name}.png" for name in self.figures}
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, figures: bool = True) -> LabResult:
        """Read a saved result; with `figures=False` only `figure_paths` is filled (no Figure is made)."""
        folder = Path(folder)
        path = folder / RESULT_FILE
        if not path.is_file() or path.is_symlink():
            raise LabError(f"{folder} holds no {RESULT_FILE}")
        if path.stat().st_size > MAX_RESULT_BYTES:
            raise LabError(f"{path} is too large to be a lab result")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise LabError(f"{path} is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise LabError(f"{path} is not a Block Studio lab result")
        if not isinstance(data.get("version"), int) or data["version"] > RESULT_VERSION:
            raise LabError(f"{path} was written by a newer Block Studio; upgrade")
        names = data.get("figures")
        if not isinstance(names, list) or not all(isinstance(n, str) and _FIGURE_NAME_RE.fullmatch(n) for n in names):
            raise LabError(f"{path} lists figures with invalid names")
        paths = {}
        for name in names:
            png = folder / f"{name}.png"
            if not png.is_file() or png.is_symlink():
                raise LabError(f"{folder} lacks the figure {name}.png")
            paths[name] = png
        fields_ok = (isinstance(data.get("method"), str) and isinstance(data.get("summary"), str)
                     and isinstance(data.get("metrics"), dict) and isinstance(data.get("tables"), dict)
                     and isinstance(data.get("settings"), dict))
        if not fields_ok:
            raise LabError(f"{path} lacks its method, summary, metrics, tables or settings")
        tables = data["tables"]
        if not all(isinstance(rows, list) and all(isinstance(r, dict) for r in rows) for rows in tables.values()):
            raise LabError(f"{path} holds a table that is not a list of rows")
        try:
            metrics = {str(k): float(v) for k, v in data["metrics"].items()}
        except (TypeError, ValueError):
            raise LabError(f"{path} holds a metric that is not a number") from None
        return cls(method=data["method"], summary=data["summary"], metrics=metrics, tables=tables,
                   figures={name: _figure_of_png(p) for name, p in paths.items()} if figures else {},
                   settings=data["settings"],
                   figure_paths=paths)


def _figure_of_png(path: Path):
    """A Figure that shows a saved PNG at its own size (saving it again gives the same picture)."""
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    pixels = imread(path, format="png")
    dpi = 100
    figure = Figure(figsize=(pixels.shape[1] / dpi, pixels.shape[0] / dpi), dpi=dpi)
    figure.figimage(pixels, resize=False)
    return figure


# -- an experiment ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One method's demo: its settings class, the function that runs it, and what a person should look at."""

    method: str  # a key of pipelines.adapters.METHODS
    settings_cls: type[LabSettings]
    run: Callable[[LabSettings, Progress], LabResult]
    description: str
