"""LQ-LoRA on the tiny causal LM: quantised plus low-rank against plain quantisation at the same memory.

Every attention and feed-forward projection of the tiny Llama is stored in a few bits a parameter. For each
budget the paper's integer program picks one format per matrix from a grid (NormalFloat 2, 3, 4 or 8 bits in
blocks of 16 or 64 with 8-bit double-quantised scales; or the paper's full 432-format grid): once for plain
quantisation (the QLoRA starting point: Q = quantize(W), the LoRA update at zero) and once for LQ-LoRA
(W ~ Q + L1 L2 by the iterative algorithm), with and without the empirical Fisher of calibration text
weighting the decomposition. The figures show the reconstruction error and the held-out perplexity each
keeps at the same bits, how the decomposition error falls over its iterations, and the bits the program gave
each matrix. Then both adapters are fine-tuned on a character task (only the low-rank factors train), to
see how much of the quantisation loss each start leaves to recover.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipelines.adapters import (
    LQLoRAConfig,
    QuantFormat,
    add_adapter,
    fisher_information,
    lq_lora_report,
    trainable_parameters,
)
from pipelines.adapters.lq_lora import allocation_table, paper_grid
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.data import LM_TASKS, lm_task
from pipelines.lab.experiments._lm_corpus import corpus, perplexity
from pipelines.lab.models import attention_targets, load_backbone, mlp_targets
from pipelines.lab.plots import heatmap, line_plot
from pipelines.lab.training import evaluate_lm, fit, lm_loss, seeded

GRIDS = ("small", "paper")
PLAIN, LQ, LQ_FISHER = "plain quantisation (QLoRA start)", "LQ-LoRA", "LQ-LoRA + Fisher"


def small_grid() -> list[QuantFormat]:
    """NF2/3/4/8 in blocks of 16 or 64, 8-bit scales double-quantised in groups of 256 with fp32: 8 formats."""
    return [QuantFormat("nf", bits, block, 8, "fp32", 256) for bits in (2, 3, 4, 8) for block in (16, 64)]


@dataclass
class LQLoRASettings(LabSettings):
    rank: int = field(default=8, metadata={"help": "rank r of L1 L2 (the tiny model is 64 wide)", "label": "Rank",
                                           "min": 1, "max": 64})
    budgets: tuple[float, ...] = field(default=(2.25, 2.5, 3.0, 3.5, 4.25), metadata={
        "help": "memory budgets in bits a parameter of the quantised matrices, one plan each", "label": "Budgets",
        "min": 2.0, "max": 16.0})
    budget: float = field(default=2.5, metadata={
        "help": "the budget whose allocation is shown and whose adapters are fine-tuned", "label": "Shown budget",
        "min": 2.0, "max": 16.0})
    grid: str = field(default="small", metadata={
        "help": "formats to choose from: 'small' (8 NF formats) or 'paper' (the official 432, each matrix decomposed in every one)",
        "label": "Format grid", "choices": GRIDS})
    fisher: bool = field(default=True, metadata={
        "help": "also plan and decompose with the empirical Fisher of calibration text (data-aware LQ-LoRA)",
        "label": "Fisher weighting"})
    fisher_sequences: int = field(default=32, metadata={
        "help": "calibration sequences for the Fisher, one a gradient", "label": "Fisher sequences",
        "min": 1, "max": 1024})
    num_iterations: int = field(default=100, metadata={"help": "most decomposition iterations (official: 100)",
                                                        "label": "Iterations", "min": 1, "max": 1000})
    task: str = field(default="sort", metadata={"help": "the character task the adapters are fine-tuned on",
                                                   "label": "Fine-tuning task", "choices": LM_TASKS})
    steps: int = field(default=100, metadata={"help": "fine-tuning steps of each adapter", "label": "Steps",
                                              "min": 0, "max": 5000})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the low-rank factors",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    eval_sequences: int = field(default=256, metadata={
        "help": "held-out sequences the perplexity is measured on", "label": "Test sequences", "min": 8, "max": 4096})

    @classmethod
    def quick(cls) -> LQLoRASettings:
        return cls(budgets=(2.5, 3.0), budget=2.5, fisher_sequences=4, num_iterations=10, steps=10,
                   eval_sequences=64)

    def validate(self) -> None:
        super().validate()
        if len(set(self.budgets)) != len(self.budgets) or not self.budgets:
            raise LabSettingsError("budgets must be one or more different numbers")


def _targets(model) -> list[str]:
    return attention_targets(model, ("q", "k", "v", "o")) + mlp_targets(model)


def _fisher(model, settings: LQLoRASettings, tokenizer, config: LQLoRAConfig):
    text = corpus("train", settings.fisher_sequences, settings.seed, tokenizer).batches(1)

    def loss(m, batch):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return m(**batch, labels=labels).loss

    return fisher_information(model, loss, text, config)


def _adapted(model, config: LQLoRAConfig, seed: int):
    adapted = copy.deepcopy(model)
    with seeded(seed):
        add_adapter(adapted, config, name="lq")
    return adapted


def _relative_error(report: dict) -> float:
    """sum ||W - (Q + s B A)||^2 / sum ||W||^2 over the adapted matrices."""
    error = sum((r["relative_error"] ** 2) * r["weight_norm"] ** 2 for r in report.values())
    return math.sqrt(error / sum(r["weight_norm"] ** 2 for r in report.values()))


def run(settings: LQLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model and the text")
    model, tokenizer = load_backbone("causal_lm", settings.model_id)
    targets = _targets(model)
    held_out = corpus("test", settings.eval_sequences, settings.seed, tokenizer)
    full = perplexity(model, held_out)
    formats = paper_grid() if settings.grid == "paper" else small_grid()
    common = dict(rank=settings.rank, num_iterations=settings.num_iterations, target_modules=targets)
    configs = {PLAIN: LQLoRAConfig(init="qlora", **common), LQ: LQLoRAConfig(**common)}
    if settings.fisher:
        progress.update(0.02, "the empirical Fisher of the calibration text")
        configs[LQ_FISHER] = LQLoRAConfig(fisher=_fisher(model, settings, tokenizer, configs[LQ]), **common)

    tables = {}
    for i, (method, config) in enumerate(configs.items()):
        span = progress.span(0.05 + 0.35 * i / len(configs), 0.05 + 0.35 * (i + 1) / len(configs))
        with seeded(settings.seed):
            tables[method] = allocation_table(model, config, formats, fisher=config.fisher,
                                              callback=lambda f, m, s=span, name=method: s.update(f, f"{name}: {m}"))
    sweep = sorted(set(settings.budgets) | {settings.budget})
    rows, curves, shown = [], {m: ([], [], []) for m in configs}, {}
    for j, budget in enumerate(sweep):
        progress.update(0.4 + 0.3 * j / len(sweep), f"building the adapters at {budget:g} bits")
        for method, config in configs.items():
            assignment = tables[method].solve(budget)
            adapted = _adapted(model, _with_formats(config, assignment), settings.seed)
            report = _report(adapted)
            bits, error, score = tables[method].average_bits(assignment), _relative_error(report), \
                perplexity(adapted, held_out)
            for series, value in zip(curves[method], (bits, error, score), strict=True):
                series.append(value)
            rows.append({"budget": budget, "method": method, "bits a parameter": round(bits, 4),
                         "relative error": round(error, 5), "perplexity": round(score, 4)})
            if budget == settings.budget:
                shown[method] = (adapted, report, bits, error, score)

    best = LQ_FISHER if settings.fisher else LQ
    task_train = lm_task(settings.task, "train", n=256, seed=settings.seed)
    task_test = lm_task(settings.task, "test", n=128, seed=settings.seed)
    fp_task = evaluate_lm(model, task_test)
    tuning, tuned = {}, []
    for k, method in enumerate((PLAIN, best)):
        adapted = shown[method][0]
        before = evaluate_lm(adapted, task_test)
        losses = fit(adapted, trainable_parameters(adapted, "lq"), lm_loss, task_train, settings.steps,
                     settings.learning_rate, progress.span(0.72 + 0.13 * k, 0.85 + 0.13 * k), seed=settings.seed,
                     message=f"fine-tuning {method}") if settings.steps else []
        after = evaluate_lm(adapted, task_test)
        tuning[method] = losses
        tuned.append({"adapter": method, "token accuracy before": round(before["token_accuracy"], 4),
                      "token accuracy after": round(after["token_accuracy"], 4),
                      "answer loss before": round(before["loss"], 4), "answer loss after": round(after["loss"], 4)})

    metrics = {"fp_perplexity": full, "fp_token_accuracy": fp_task["token_accuracy"], "fp_answer_loss": fp_task["loss"]}
    for method, key in ((PLAIN, "plain"), (LQ, "lq"), (LQ_FISHER, "lq_fisher")):
        if method in shown:
            _, _, bits, error, score = shown[method]
            metrics.update({f"{key}_bits": bits, f"{key}_error": error, f"{key}_perplexity": score})
    for row, key in zip(tuned, ("plain", "best"), strict=True):
        for when in ("before", "after"):
            metrics[f"{key}_token_accuracy_{when}"] = row[f"token accuracy {when}"]
            metrics[f"{key}_answer_loss_{when}"] = row[f"answer loss {when}"]

    report = shown[best][1]
    allocation = [{"module": module, "format": r["format"], "bits a parameter": round(r["bits_per_parameter"], 4),
                   "relative error": round(r["relative_error"], 5), "iterations": len(r["iteration_errors"])}
                  for module, r in report.items()]
    figures = {
        "reconstruction_error": line_plot({m: (c[0], c[1]) for m, c in curves.items()}, logy=True,
                                          title="Reconstruction error at each budget", xlabel="bits a parameter",
                                          ylabel="||W - (Q + L1 L2)|| / ||W||"),
        "perplexity": line_plot({m: (c[0], c[2]) for m, c in curves.items()}, hlines={"full precision": full},
                                title="Held-out perplexity at each budget (before fine-tuning)",
                                xlabel="bits a parameter", ylabel="perplexity"),
        "bits_per_matrix": _allocation_figure(report, settings.budget, best),
        "decomposition_by_iteration": _iteration_figure(shown[LQ][1], shown[PLAIN][1], settings.budget),
    }
    if settings.steps:
        figures["fine_tuning"] = line_plot(tuning, markers=False, title=f"Fine-tuning on '{settings.task}' at "
                                           f"{settings.budget:g} bits", xlabel="step", ylabel="training loss")
    summary = (
        f"At **{settings.budget:g} bits a parameter** the integer program stores the tiny Llama's "
        f"{len(report)} projection matrices in {metrics['plain_bits']:.3f} (plain quantisation) and "
        f"{metrics['lq_bits']:.3f} bits (LQ-LoRA, plus rank-{settings.rank} factors). The relative reconstruction "
        f"error falls from {metrics['plain_error']:.4f} to {metrics['lq_error']:.4f}, and the held-out "
        f"perplexity (full precision {full:.3f}) from {metrics['plain_perplexity']:.3f} to "
        f"{metrics['lq_perplexity']:.3f}."
    )
    if settings.fisher:
        summary += (f" Weighted by the empirical Fisher, LQ-LoRA reaches a perplexity of "
                    f"{metrics['lq_fisher_perplexity']:.3f} (relative error {metrics['lq_fisher_error']:.4f}).")
    summary += (f" On '{settings.task}' (full precision: {fp_task['token_accuracy']:.1%} of the answer tokens right) "
                f"the QLoRA start gets {tuned[0]['token accuracy before']:.1%} and {best} "
                f"{tuned[1]['token accuracy before']:.1%}; after {settings.steps} fine-tuning steps of the low-rank "
                f"factors {tuned[0]['token accuracy after']:.1%} and {tuned[1]['token accuracy after']:.1%}.")
    return LabResult(method="lq-lora", summary=summary, metrics=metrics,
                     tables={"budgets": rows, "allocation": allocation, "fine_tuning": tuned},
                     figures=figures, settings=settings.to_dict())


def _with_formats(config: LQLoRAConfig, assignment: dict[str, str]) -> LQLoRAConfig:
    return dataclasses.replace(config, formats=assignment)


def _report(adapted) -> dict:
    report = lq_lora_report(adapted, "lq")
    for module, entry in report.items():
        entry["weight_norm"] = float(adapted.get_submodule(module).original_module().weight.float().norm())
    return report


def _split(module: str) -> tuple[str, str]:
    """("block 3", "q_proj") for "model.layers.3.self_attn.q_proj"."""
    match = re.search(r"(?:^|\.)(\d+)\.", module)
    return (f"block {match.group(1)}" if match else "model"), module.rsplit(".", 1)[-1]


def _allocation_figure(report: dict, budget: float, method: str) -> Figure:
    rows, columns = [], []
    for module in report:
        row, column = _split(module)
        rows += [row] if row not in rows else []
        columns += [column] if column not in columns else []
    matrix = [[math.nan] * len(columns) for _ in rows]
    for module, entry in report.items():
        row, column = _split(module)
        matrix[rows.index(row)][columns.index(column)] = round(entry["bits_per_parameter"], 2)
    return heatmap(matrix, row_labels=rows, col_labels=columns, colorbar_label="bits a parameter",
                   title=f"Bits each matrix received at {budget:g} bits ({method})", xlabel="", ylabel="")


def _iteration_figure(lq: dict, plain: dict, budget: float) -> Figure:
    """Mean relative decomposition error over the iterations, per projection type (each matrix keeps its last
    value once it stopped); plain quantisation's error at the same budget as a line."""
    kinds: dict[str, list[list[float]]] = {}
    for module, entry in lq.items():
        norm = entry["weight_norm"]
        kinds.setdefault(_split(module)[1], []).append([e / norm for e in entry["iteration_errors"]])
    series = {}
    for kind, runs in kinds.items():
        length = max(len(r) for r in runs)
        padded = [r + [r[-1]] * (length - len(r)) for r in runs]
        series[kind] = [sum(values) / len(values) for values in zip(*padded, strict=True)]
    plain_error = sum(e["relative_error"] for e in plain.values()) / len(plain)
    figure = line_plot(series, markers=False, hlines={"plain quantisation (mean)": plain_error},
                       title=f"LQ-LoRA decomposition error by iteration at {budget:g} bits",
                       xlabel="iteration", ylabel="||W - (Q + L1 L2)|| / ||W|| (mean)")
    figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


register_experiment(Experiment(
    method="lq-lora", settings_cls=LQLoRASettings, run=run,
    description="The tiny Llama's projections stored in a few bits a parameter, formats chosen per matrix by the "
                "paper's integer program: plain quantisation against LQ-LoRA's quantised plus low-rank "
                "decomposition (and its Fisher-weighted form) at the same budgets. Look at the reconstruction "
                "error and perplexity by budget, the bits each matrix got, and fine-tuning from each start.",
))
