"""The lab's first panel: what the lab is for and which adapter methods will get panels."""

from __future__ import annotations

import gradio as gr

TITLE = "Overview"
ORDER = 0
PLANNED = (
    ("Block-LoRA", "parameters and FLOPs against LoRA at equal accuracy"),
    ("LoRID", "three LoRAs that check each other's reasoning"),
    ("MiSS (Bone)", "block-affine shard sharing on a toy regression"),
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
    ("DV-LoRA (EndoDAC)", "training only vectors in a second phase"),
    ("GS-LoRA", "forgetting chosen classes while keeping the rest"),
    ("SoRA", "a gate that sparsifies the rank while training"),
    ("ExPLoRA", "extended pre-training of a vision transformer"),
)


def build(studio) -> None:
    rows = "\n".join(f"| {name} | {what} |" for name, what in PLANNED)
    gr.Markdown(
        "The lab shows adapter methods for text and vision models on small tasks that run on a CPU in "
        "seconds, each in a panel of its own. Panels arrive with the methods; this table lists what is "
        "planned.\n\n| method | what its panel will show |\n| --- | --- |\n" + rows + "\n\n"
        "Adding a panel means adding one module to `studio/ui/lab/` with a `TITLE` and a `build(studio)` "
        "function."
    )
