"""Settings fields with their metadata: one declaration gives a setting its default, its checks, its CLI option
and its Train-form control.

A recipe's request dataclass declares each field with `setting(default, ...)`. `setting_fields(cls)` reads them
back (`SettingField`: kind, default, help, range, choices, flag, form), `check_fields(obj)` checks an object's
values against that metadata in place (numbers become plain ints and floats; bools, NaN and infinities are
refused with one line naming the setting), and the CLI and the Train form build their options from the same
fields. Metadata keys, all optional:

- `help`: one sentence for `--help` and the form (`{token_example}` and `{style_token_example}` become a token of
  the kind the recipe derives, e.g. `[v42]`);
- `label`: the noun error messages use ("learning rate"); `form_label`: the form's label ("Learning rate");
- `min`, `max`, `above_min` (the minimum itself excluded): the range of a number;
- `choices`: the values a setting may take;
- `flag`: the CLI option ("--lr"; default `--<name>`), or None for no option; `required`: the option must be
  given; `invert`: a `store_true` option that sets the field to False (`--no-samples`);
- `form`: the setting is a control of the recipe's own settings in the Train form; `advanced`: it sits in the
  form's closed "advanced" part; `widget`: "dropdown" (with `form_choices`), "number", "text" or "checkbox".
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from pipelines import checks
from pipelines.errors import InvalidSetting

_NO_FLAG = object()


def setting(default: Any = dataclasses.MISSING, *, help: str = "", label: str | None = None,
            form_label: str | None = None, min: float | None = None, max: float | None = None,
            above_min: bool = False, choices: tuple | None = None, flag: Any = _NO_FLAG, required: bool = False,
            invert: bool = False, form: bool = False, advanced: bool = False, widget: str | None = None,
            form_choices: tuple | None = None) -> Any:
    """A dataclass field with its metadata (see the module docstring). Metadata left out is not stored."""
    metadata = {"help": help, "label": label, "form_label": form_label, "min": min, "max": max,
                "above_min": above_min or None, "choices": tuple(choices) if choices is not None else None,
                "required": required or None, "invert": invert or None, "form": form or None,
                "advanced": advanced or None, "widget": widget,
                "form_choices": tuple(form_choices) if form_choices is not None else None}
    if flag is not _NO_FLAG:
        metadata["flag"] = flag
    metadata = {k: v for k, v in metadata.items() if v is not None or k == "flag"}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def like(owner: type, name: str, default: Any, **changes: Any) -> Any:
    """The field `name` of `owner` with another default (and any metadata changed): a subclass's own default."""
    inherited = dict(next(f for f in dataclasses.fields(owner) if f.name == name).metadata)
    inherited.update(changes)
    return setting(default, **inherited)


@dataclass(frozen=True)
class SettingField:
    """One setting as the CLI, the form and the checks see it."""

    name: str
    kind: str  # "int", "float", "str", "flag" (a plain bool) or "tristate" (bool or None)
    optional: bool  # None is a value the setting may take
    default: Any
    help: str
    label: str  # the noun an error message uses
    form_label: str
    minimum: float | None
    maximum: float | None
    above_minimum: bool
    choices: tuple | None
    flag: str | None  # the CLI option, or None
    required: bool
    invert: bool
    form: bool
    advanced: bool
    widget: str | None
    form_choices: tuple | None

    @property
    def dest(self) -> str | None:
        """The attribute argparse stores the option under (`--training-guidance` -> `training_guidance`)."""
        return self.flag[2:].replace("-", "_") if self.flag else None


_FIELDS: dict[type, list[SettingField]] = {}


def setting_fields(cls: type) -> list[SettingField]:
    """The settings of a dataclass in declaration order (a subclass's own fields after its parent's)."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            kind, optional = _kind_of(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            label = meta.get("label") or f.name.replace("_", " ")
            flag = meta["flag"] if "flag" in meta else "--" + f.name.replace("_", "-")
            out.append(SettingField(
                name=f.name, kind=kind, optional=optional or default is None, default=default,
                help=meta.get("help", ""), label=label, form_label=meta.get("form_label") or label.capitalize(),
                minimum=meta.get("min"), maximum=meta.get("max"), above_minimum=bool(meta.get("above_min")),
                choices=meta.get("choices"), flag=flag, required=bool(meta.get("required")),
                invert=bool(meta.get("invert")), form=bool(meta.get("form")), advanced=bool(meta.get("advanced")),
                widget=meta.get("widget"), form_choices=meta.get("form_choices"),
            ))
        _FIELDS[cls] = out
    return _FIELDS[cls]


def setting_field(cls: type, name: str) -> SettingField:
    return next(f for f in setting_fields(cls) if f.name == name)


def _kind_of(hint: Any) -> tuple[str, bool]:
    """("int" | "float" | "str" | "flag" | "tristate", whether None is allowed) of a type hint."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UNION) else (hint,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    first = kinds[0] if kinds else Any
    if first is bool:
        return ("tristate" if optional else "flag"), optional
    if first is int:
        return "int", optional
    if first is float:
        return "float", optional
    return "str", optional


_UNION = type(int | None)


def check_value(spec: SettingField, value: Any) -> Any:
    """`value` checked against `spec` (one line naming the setting if it does not fit); numbers made plain."""
    if value is None and spec.optional:
        return None
    if spec.choices is not None:
        if isinstance(value, bool) or value not in spec.choices:
            raise InvalidSetting(f"{spec.label} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
        return value
    if spec.kind == "tristate":
        if not isinstance(value, bool):
            raise InvalidSetting(f"{spec.label} must be on, off or unset, not {value!r}")
        return value
    low = spec.minimum if spec.minimum is not None else -float("inf")
    high = spec.maximum if spec.maximum is not None else float("inf")
    if spec.kind == "int" and (spec.minimum is not None or spec.maximum is not None):
        return checks.whole_number(value, spec.label, int(low) if spec.minimum is not None else -2**63,
                                   int(high) if spec.maximum is not None else 2**63)
    if spec.kind == "float" and (spec.minimum is not None or spec.maximum is not None):
        return checks.real_number(value, spec.label, low, high, above_low=spec.above_minimum)
    return value


def check_fields(obj: Any, source: type | None = None) -> None:
    """Check every setting of `obj` that has a range, choices or is a tri-state, in place.

    `source` is the dataclass whose metadata applies (default: `obj`'s own class); fields of `obj` that `source`
    does not declare are left alone, so a recipe's resolved settings are checked by its request's metadata.
    """
    names = {f.name for f in dataclasses.fields(obj)}
    for spec in setting_fields(source or type(obj)):
        if spec.name not in names:
            continue
        if spec.choices is None and spec.kind != "tristate" and spec.minimum is None and spec.maximum is None:
            continue
        setattr(obj, spec.name, check_value(spec, getattr(obj, spec.name)))


def defaults(cls: type) -> dict[str, Any]:
    """The dataclass's own defaults, by field name (fields without one are left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
