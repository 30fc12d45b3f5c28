"""The lab's first panel: every adapter method of the registry with its paper, the property its demo shows, and
whether its panel is ready (or why not); then the methods still to come."""

from __future__ import annotations

import re

import gradio as gr

TITLE = "Overview"
ORDER = 0

# The methods the lab is planned to cover; those registered in pipelines.adapters are listed from the registry.
PLANNED = (
    ("Block-LoRA", "parameters and FLOPs against LoRA at equal accuracy"),
    ("LoRID", "three LoRAs that check each other's reasoning"),
    ("MiSS", "block-affine shard sharing on a toy regression"),
    ("MixLoRA", "LoRA experts in the feed-forward layers, with and without balancing"),
    ("LQ-LoRA", "low-rank plus quantised decomposition under a bit budget"),
    ("SMoRA", "one rank per expert, activation heat map"),
    ("CBQ", "cross-block quantisation with LoRA rounding"),
    ("Relaxed Recursive Transformers", "shared layers told apart by per-copy LoRA"),
    ("Granite-speech", "a LoRA switched off for bit-identical text mode"),
    ("DyLoRA", "every rank usable after one training run"),
    ("X-LoRA", "per-token scalings that pick the right expert"),
    ("Hot-Swap MarkBoard", "a signature read back after hot-swapping"),
    ("MergeVLA", "merging task adapters with masks and a router"),
    ("DV-LoRA", "training only vectors in a second phase"),
    ("GS-LoRA", "forgetting chosen classes while keeping the rest"),
    ("SoRA", "a gate that sparsifies the rank while training"),
    ("ExPLoRA", "extended pre-training of a vision transformer"),
)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def method_status(name: str) -> str:
    """"panel ready", "no experiment yet", or "unavailable: why" for a registered method."""
    from pipelines.adapters import METHODS
    from pipelines.lab import BROKEN, EXPERIMENTS

    info = METHODS[name]
    ok, why = info.available()
    if not ok:
        return f"unavailable: {why}"
    if name in EXPERIMENTS:
        return "panel ready"
    broken = BROKEN.get(name.replace("-", "_")) or BROKEN.get(name)
    if broken:
        return f"unavailable: its experiment failed to load ({broken})"
    return "no experiment yet"


def overview_rows() -> list[dict[str, str]]:
    """One row per registered method: the lab's methods first, then the studio's own training layers."""
    from pipelines.adapters import METHODS

    ordered = sorted(METHODS.values(), key=lambda m: (m.studio and m.name not in _experiments(), m.title.lower()))
    return [{"method": info.name, "title": info.title, "paper": info.paper, "property": info.property,
             "status": method_status(info.name) + (" (a layer of the studio's own recipes)" if info.studio else "")}
            for info in ordered]


def _experiments() -> set[str]:
    from pipelines.lab import EXPERIMENTS

    return set(EXPERIMENTS)


def planned_rows() -> list[tuple[str, str]]:
    """The planned methods that are not registered yet."""
    from pipelines.adapters import METHODS

    known = {_key(m.name) for m in METHODS.values()} | {_key(m.title) for m in METHODS.values()}
    return [(title, what) for title, what in PLANNED if _key(title) not in known]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def overview_markdown() -> str:
    lines = [
        "The lab shows adapter methods for text and vision models on small offline tasks that run on a CPU in "
        "seconds to a minute, each in a panel of its own: settings, **Run** (through the studio's job queue, "
        "with progress and Cancel), and the result as figures and tables.",
        "",
        "| method | paper | what its panel shows | status |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| **{_cell(r['title'])}** (`{r['method']}`) | {_cell(r['paper'])} | {_cell(r['property'])} | "
              f"{_cell(r['status'])} |" for r in overview_rows()]
    planned = planned_rows()
    if planned:
        lines += ["", "Still to come:", "", "| method | what its panel will show |", "| --- | --- |"]
        lines += [f"| {_cell(title)} | {_cell(what)} |" for title, what in planned]
    lines += ["", "A method gets its panel from one module in `pipelines/adapters/` (the method) and one in "
              "`pipelines/lab/experiments/` (its experiment); `blockstudio lab run METHOD` runs it from the "
              "command line."]
    return "\n".join(lines)


def build(studio) -> None:
    gr.Markdown(overview_markdown(), elem_id="lab-overview")
