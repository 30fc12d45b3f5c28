"""CBQ on the tiny causal LM: round-to-nearest, block-wise and cross-block reconstruction at the same bits.

The tiny Llama's attention and feed-forward projections are quantised to `bits` (weights only by default, as in
the paper's W2A16; activations too with `act_bits` below 16), three ways from the same full-precision model:
round-to-nearest on a min-max grid (no data); CBQ's reconstruction one block at a time (window 1, BRECQ's
granularity); and CBQ's cross-block reconstruction (windows of `window_size` blocks sharing `overlap`), both
with LoRA-Rounding, learned step sizes and the coarse-to-fine outlier preprocessing, on the same calibration
sequences for the same steps a window. Perplexity on held-out text in the pre-training mix measures what each
keeps of the model, and each block's relative output error (in the whole quantised model against the full-
precision one) where the error builds up. The paper's method section could not be read: see
`pipelines/adapters/cbq/` for what follows the summaries and what is ours.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipelines.adapters import CBQConfig, add_adapter, block_output_errors, cbq_calibrate, layers_of
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments._lm_corpus import corpus, decoder_blocks, perplexity
from pipelines.lab.models import attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import bar_plot, line_plot
from pipelines.lab.training import seeded

RTN, BLOCKWISE, CROSS = "round to nearest", "block-wise", "cross-block"


@dataclass
class CBQSettings(LabSettings):
    bits: int = field(default=2, metadata={"help": "weight bits of every method (the paper's hardest: W2A16)",
                                           "label": "Weight bits", "min": 2, "max": 8})
    act_bits: int = field(default=16, metadata={
        "help": "activation bits; 16 quantises the weights only", "label": "Activation bits", "min": 4, "max": 16})
    rank: int = field(default=4, metadata={"help": "rank of LoRA-Rounding's A1 A2", "label": "Rounding rank",
                                           "min": 1, "max": 64})
    window_size: int = field(default=2, metadata={
        "help": "blocks reconstructed together by cross-block CBQ (the tiny model has two)", "label": "Window",
        "min": 2, "max": 64})
    overlap: int = field(default=1, metadata={"help": "blocks two consecutive windows share", "label": "Overlap",
                                              "min": 0, "max": 63})
    steps: int = field(default=200, metadata={"help": "optimiser steps a window", "label": "Steps a window",
                                              "min": 1, "max": 5000})
    learning_rate: float = field(default=1e-2, metadata={"help": "Adam learning rate of the rounding",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    cfp: bool = field(default=True, metadata={"help": "coarse-to-fine outlier preprocessing before reconstructing",
                                              "label": "Outlier preprocessing"})
    calibration_sequences: int = field(default=32, metadata={
        "help": "calibration sequences (8 a batch)", "label": "Calibration sequences", "min": 8, "max": 1024})
    eval_sequences: int = field(default=256, metadata={
        "help": "held-out sequences the perplexity and block errors are measured on", "label": "Test sequences",
        "min": 8, "max": 4096})

    @classmethod
    def quick(cls) -> CBQSettings:
        return cls(steps=15, calibration_sequences=16, eval_sequences=64)

    def validate(self) -> None:
        super().validate()
        if self.overlap >= self.window_size:
            raise LabSettingsError(f"overlap must be smaller than the window ({self.window_size}), not {self.overlap}")


def _quantize(model, settings: CBQSettings, targets, method: str, calibration, progress: Progress):
    """A copy of `model` quantised by `method`; its calibration report (None for round to nearest)."""
    quantized = copy.deepcopy(model)
    window, overlap = (1, 0) if method == BLOCKWISE else (settings.window_size, settings.overlap)
    config = CBQConfig(bits=settings.bits, act_bits=settings.act_bits, rank=settings.rank,
                       rounding="nearest" if method == RTN else "lora", window_size=window, overlap=overlap,
                       steps=settings.steps, learning_rate=settings.learning_rate, cfp=settings.cfp,
                       target_modules=targets)
    with seeded(settings.seed):
        add_adapter(quantized, config, name="cbq")
    if method == RTN:
        return quantized, None
    report = cbq_calibrate(quantized, "cbq", decoder_blocks(quantized), calibration,
                           callback=lambda fraction, message: progress.update(fraction, f"{method}: {message}"))
    return quantized, report


def run(settings: CBQSettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model and the text")
    model, tokenizer = load_backbone("causal_lm", settings.model_id)
    decoder_blocks(model)  # a model without a list of transformer blocks fails here, before any work
    targets = attention_targets(model, ("q", "k", "v", "o")) + mlp_targets(model)
    calibration = corpus("train", settings.calibration_sequences, settings.seed, tokenizer).batches(8)
    held_out = corpus("test", settings.eval_sequences, settings.seed, tokenizer)
    evaluation = held_out.batches(128)
    full = perplexity(model, held_out)

    rows, errors, curves, metrics = [], {}, {}, {"fp_perplexity": full}
    spans = {RTN: (0.02, 0.1), BLOCKWISE: (0.1, 0.55), CROSS: (0.55, 0.98)}
    for method, key in ((RTN, "rtn"), (BLOCKWISE, "blockwise"), (CROSS, "crossblock")):
        started = time.perf_counter()
        quantized, report = _quantize(model, settings, targets, method, calibration, progress.span(*spans[method]))
        seconds = time.perf_counter() - started
        score = perplexity(quantized, held_out)
        errors[method] = block_output_errors(quantized, decoder_blocks(quantized), evaluation)
        layers = [stack[0] for stack in layers_of(quantized, "cbq").values()]
        rounding = sum(layer.rounding_parameter_count() for layer in layers)
        metrics[f"{key}_perplexity"], metrics[f"{key}_last_block_error"] = score, errors[method][-1]
        if report is not None:
            curves[method] = [loss for window in report.losses for loss in window]
            windows = ", ".join(f"{a + 1}-{b + 1}" if b > a else f"{a + 1}" for a, b in report.windows)
        else:
            windows = "none (no data)"
        rows.append({"method": method, "bits": f"W{settings.bits}A{settings.act_bits}", "windows (blocks)": windows,
                     "perplexity": round(score, 4), "last block error": round(errors[method][-1], 5),
                     "rounding parameters": rounding, "seconds": round(seconds, 1)})
    full_rounding = sum(layer.out_features * layer.in_features for layer in layers)
    metrics["rounding_parameters"] = float(rows[-1]["rounding parameters"])
    metrics["adaround_parameters"] = float(full_rounding)

    figures = {
        "perplexity": bar_plot(["full precision", RTN, BLOCKWISE, CROSS],
                               [full] + [metrics[f"{k}_perplexity"] for k in ("rtn", "blockwise", "crossblock")],
                               title=f"Held-out perplexity at W{settings.bits}A{settings.act_bits}", xlabel="",
                               ylabel="perplexity (lower is better)"),
        "per_block_error": _block_figure(errors),
        "calibration_loss": _loss_figure(curves, settings),
    }
    summary = (
        f"At **W{settings.bits}A{settings.act_bits}** the full-precision model's held-out perplexity of {full:.3f} "
        f"becomes {metrics['rtn_perplexity']:.3f} with round-to-nearest, {metrics['blockwise_perplexity']:.3f} "
        f"with block-by-block reconstruction and {metrics['crossblock_perplexity']:.3f} with cross-block "
        f"reconstruction (windows of {settings.window_size} blocks, overlap {settings.overlap}). The last block's "
        f"relative error goes from {metrics['rtn_last_block_error']:.4f} (RTN) to "
        f"{metrics['blockwise_last_block_error']:.4f} (block-wise) and {metrics['crossblock_last_block_error']:.4f} "
        f"(cross-block). LoRA-Rounding at rank {settings.rank} learns {int(metrics['rounding_parameters']):,} "
        f"rounding numbers where AdaRound's dense V would learn {full_rounding:,}."
    )
    return LabResult(method="cbq", summary=summary, metrics=metrics, tables={"quantisation": rows},
                     figures=figures, settings=settings.to_dict())


def _block_figure(errors: dict[str, list[float]]) -> Figure:
    figure = line_plot({m: (list(range(1, len(e) + 1)), e) for m, e in errors.items()}, logy=True,
                       title="Each block's output error in the quantised model", xlabel="block",
                       ylabel="||h_q - h_fp||² / ||h_fp||²")
    figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _loss_figure(curves: dict[str, list[float]], settings: CBQSettings) -> Figure:
    figure = line_plot({m: c for m, c in curves.items()}, markers=False, logy=True,
                       title="Reconstruction loss while calibrating, window after window",
                       xlabel="step (all windows in turn)", ylabel="window loss")
    for boundary in range(settings.steps, max(len(c) for c in curves.values()), settings.steps):
        figure.axes[0].axvline(boundary, color="grey", linestyle=":")
    return figure


register_experiment(Experiment(
    method="cbq", settings_cls=CBQSettings, run=run,
    description="The tiny Llama's projections quantised to a few bits three ways: round-to-nearest, CBQ's "
                "reconstruction one block at a time, and CBQ's cross-block windows, with LoRA-Rounding and outlier "
                "preprocessing. Look at the held-out perplexity and at each block's output error.",
))
