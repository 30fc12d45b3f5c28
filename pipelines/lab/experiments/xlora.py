"""X-LoRA on character tasks: a classifier on the model's hidden states picks, token by token, the LoRA expert of
the task at hand.

One LoRA expert per task (copy, reverse, sort by default) is trained on that task alone and saved; X-LoRA (PEFT's
classifier and layers) then mixes the frozen experts, and only its classifier is trained, on batches that mix the
tasks. The heat map shows the per-token scalings on one mixed-task input, an example of each task one after the
other in a single sequence (the tiny model was pre-trained on one example a sequence, so this input is harder for
it than a batch of single examples): the scalings should switch to each segment's expert. The routing accuracy is
the share of the positions predicting an answer token whose largest scaling is their task's expert, on single-task
test examples and on test sequences holding two tasks. Accuracy per task compares the base model, each expert
alone on every task, and the X-LoRA mixture.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.adapters import (
    LoRAConfig,
    XLoRAConfig,
    add_adapter,
    count_parameters,
    save_adapter,
    trainable_parameters,
    xlora_scalings,
)
from pipelines.lab import Experiment, LabResult, Progress, register_experiment
from pipelines.lab.data import LM_TASKS
from pipelines.lab.experiments._tasks import (
    MultiTaskSettings,
    accuracy_report,
    language_model,
    mixed_tasks,
    segmented,
    task_accuracies,
    task_tests,
)
from pipelines.lab.models import attention_targets, mlp_targets
from pipelines.lab.plots import heatmap, line_plot
from pipelines.lab.training import fit, lm_loss, seeded

NAME = "mixture"


@dataclass
class XLoRASettings(MultiTaskSettings):
    tasks: tuple[str, ...] = field(default=("copy", "reverse", "sort"), metadata={  # add is barely learnt here
        "help": "one LoRA expert per task, then X-LoRA over them", "label": "Tasks (experts)", "choices": LM_TASKS})
    expert_rank: int = field(default=4, metadata={"help": "rank of each expert (alpha = 2 r)", "label": "Expert rank",
                                                  "min": 1, "max": 64})
    expert_steps: int = field(default=150, metadata={"help": "training steps of each expert on its own task",
                                                     "label": "Expert steps", "min": 1, "max": 5000})
    classifier_steps: int = field(default=400, metadata={"help": "training steps of the X-LoRA classifier",
                                                         "label": "Classifier steps", "min": 1, "max": 5000})
    classifier_learning_rate: float = field(default=3e-2, metadata={
        "help": "AdamW learning rate of the classifier", "label": "Classifier learning rate", "min": 1e-6,
        "max": 1.0})
    xlora_depth: int = field(default=1, metadata={"help": "layers of the classifier (PEFT's default 1)",
                                                  "label": "Classifier depth", "min": 1, "max": 4})
    xlora_size: int = field(default=64, metadata={"help": "hidden width of a deeper classifier (PEFT: 2048)",
                                                  "label": "Classifier width", "min": 1, "max": 4096})
    softmax_temperature: float = field(default=1.0, metadata={"help": "T of the scalings' softmax (PEFT: 1)",
                                                              "label": "Softmax temperature", "min": 0.01,
                                                              "max": 100.0})

    @classmethod
    def quick(cls) -> XLoRASettings:
        return cls(expert_steps=50, classifier_steps=80, classifier_learning_rate=0.05, test_per_task=32,
                   batch_size=16)


def _answer_tokens(task) -> torch.Tensor:
    """Where the model predicts an answer token: position t predicts token t + 1."""
    return task.labels[:, 1:] != -100


@torch.no_grad()
def scalings_on(model: nn.Module, data) -> torch.Tensor:
    """The scalings of the first adapted layer on `data`, (batch, seq, experts)."""
    model.eval()
    model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    return xlora_scalings(model, NAME)[:, :, 0, :]


def routing(model: nn.Module, tests: dict, experts: list[str]) -> tuple[dict, dict]:
    """Per task, over the positions that predict its answer tokens: the mean scaling of each expert, and the share
    of positions whose largest scaling is the task's own expert."""
    means, hits = {}, {}
    for task, data in tests.items():
        scalings = scalings_on(model, data)[:, :-1][_answer_tokens(data)]
        means[task] = scalings.mean(0)
        hits[task] = float((scalings.argmax(-1) == experts.index(task)).float().mean())
    return means, hits


def segment_accuracy(model: nn.Module, data, owners: torch.Tensor) -> float:
    """On sequences holding several tasks one after the other: the share of the positions predicting an answer
    token whose largest scaling is the expert of the segment they stand in."""
    scalings = scalings_on(model, data)[:, :-1]
    where = _answer_tokens(data)
    return float((scalings.argmax(-1)[where] == owners[:, :-1][where]).float().mean())


def run(settings: XLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model")
    base, tokenizer = language_model(settings.model_id)
    tasks = list(settings.tasks)
    tests = task_tests(tasks, settings.test_per_task, settings.seed, tokenizer)
    targets = attention_targets(base, ("q", "k", "v", "o")) + mlp_targets(base)
    experts: dict[str, nn.Module] = {}
    share = 0.6 / len(tasks)
    with tempfile.TemporaryDirectory(prefix="xlora-experts-") as folder:
        folders = {}
        for i, task in enumerate(tasks):
            model = copy.deepcopy(base)
            with seeded(settings.seed + 1 + i):
                add_adapter(model, LoRAConfig(rank=settings.expert_rank, scale=2.0, target_modules=targets), task)
            data = mixed_tasks([task], "train", settings.train_per_task, settings.seed, tokenizer)
            fit(model, trainable_parameters(model, task), lm_loss, data, settings.expert_steps,
                settings.learning_rate, progress.span(0.02 + i * share, 0.02 + (i + 1) * share),
                batch_size=settings.batch_size, seed=settings.seed, message=f"the {task} expert")
            model.eval()
            experts[task] = model
            folders[task] = save_adapter(model, Path(folder) / task, task)

        mixture = copy.deepcopy(base)
        config = XLoRAConfig.from_adapters(folders, xlora_depth=settings.xlora_depth, xlora_size=settings.xlora_size,
                                           softmax_temperature=settings.softmax_temperature)
        with seeded(settings.seed + 100):
            add_adapter(mixture, config, NAME)
    train = mixed_tasks(tasks, "train", settings.train_per_task, settings.seed, tokenizer)
    curve = fit(mixture, trainable_parameters(mixture, NAME), lm_loss, train, settings.classifier_steps,
                settings.classifier_learning_rate, progress.span(0.62, 0.95), batch_size=settings.batch_size,
                seed=settings.seed, message="the X-LoRA classifier")
    mixture.eval()

    progress.update(0.95, "scoring each task and reading the scalings")
    variants = {"base": ("base model", base)} | {
        f"expert_{task}": (f"{task} expert alone", model) for task, model in experts.items()} | {
        "xlora": ("X-LoRA", mixture)}
    accuracy_metrics, rows, accuracy_figure = accuracy_report(
        {key: label for key, (label, _) in variants.items()},
        {key: task_accuracies(model, tests) for key, (_, model) in variants.items()}, tasks)
    means, routed = routing(mixture, tests, tasks)
    two_tasks, two_owners = segmented(tasks, "test", settings.test_per_task, settings.seed, tokenizer)
    # The input shown: one short example of every task, one after the other, in a single sequence.
    shown, shown_owners = segmented(tasks, "test", 1, settings.seed + 1, tokenizer, per_sequence=len(tasks),
                                    max_len=4)
    per_token = scalings_on(mixture, shown)[0]  # (seq, experts)
    token_text = [tokenizer.decode([t], skip_special=False) for t in shown.input_ids[0].tolist()]

    metrics: dict[str, float] = {
        "classifier_parameters": float(count_parameters(mixture, NAME)),
        "expert_parameters": float(count_parameters(experts[tasks[0]], tasks[0])),
        "routing_accuracy": sum(routed.values()) / len(tasks),
        "segment_accuracy": segment_accuracy(mixture, two_tasks, two_owners),
        "shown_input_segment_accuracy": segment_accuracy(mixture, shown, shown_owners),
        "classifier_loss_first": curve[0], "classifier_loss_last": sum(curve[-10:]) / len(curve[-10:]),
        **accuracy_metrics,
    }
    for task in tasks:
        metrics[f"routing_accuracy_{task}"] = routed[task]
    best_single = max((key for key in variants if key.startswith("expert_")),
                      key=lambda key: metrics[f"mean_accuracy_{key}"])
    metrics["mean_accuracy_best_single_expert"] = metrics[f"mean_accuracy_{best_single}"]

    order = [tasks[i] for i in dict.fromkeys(shown_owners[0][shown_owners[0] >= 0].tolist())]
    figures = {
        "scalings_on_mixed_input": _token_map(per_token, token_text, shown_owners[0], tasks, order),
        "mean_scaling_per_task": heatmap(
            [means[task].tolist() for task in tasks], title="Mean scaling of each expert on each task's answers",
            xlabel="expert", ylabel="task", row_labels=tasks, col_labels=tasks, colorbar_label="mean scaling"),
        "accuracy_per_task": accuracy_figure,
        "classifier_training": line_plot(
            {"X-LoRA classifier": curve}, markers=False, title="Training the classifier on the tasks mixed",
            xlabel="step", ylabel="loss on the answers"),
    }
    routing_rows = [{"task": task, **{f"scaling of {e}": round(float(means[task][j]), 3) for j, e in enumerate(tasks)},
                     "routed to its expert": round(routed[task], 3)} for task in tasks]
    summary = (
        f"Each of {len(tasks)} LoRA experts ({int(metrics['expert_parameters']):,} numbers) was trained on one task; "
        f"X-LoRA trains only its classifier ({int(metrics['classifier_parameters']):,} numbers). On the test "
        f"answers the largest scaling is the task's own expert for {metrics['routing_accuracy']:.0%} of the tokens "
        f"(chance {1 / len(tasks):.0%}); on test sequences holding two tasks one after the other, the scalings pick "
        f"the segment's expert for {metrics['segment_accuracy']:.0%} of the tokens. Mean "
        f"token accuracy over the tasks: base {metrics['mean_accuracy_base']:.3f}, the best single expert "
        f"({variants[best_single][0]}) {metrics['mean_accuracy_best_single_expert']:.3f}, X-LoRA "
        f"{metrics['mean_accuracy_xlora']:.3f}."
    )
    return LabResult(method="xlora", summary=summary, metrics=metrics,
                     tables={"accuracy": rows, "routing": routing_rows}, figures=figures, settings=settings.to_dict())


def _token_map(scalings: torch.Tensor, text: list[str], owners: torch.Tensor, experts: list[str],
               order: list[str]):
    """The token x expert heat map of one input, a dashed line where a new task's segment begins."""
    labels = [{"<bos>": "^", "<eos>": "$", " ": "_"}.get(t, t) for t in text]
    figure = heatmap(scalings.T.tolist(), title="Per-token scalings on one input holding every task in turn",
                     xlabel="token (segments: " + " | ".join(order) + ")", ylabel="expert", row_labels=experts,
                     col_labels=labels, colorbar_label="scaling", annotate=False)
    axes = figure.axes[0]
    for t in range(1, len(owners)):
        if owners[t] >= 0 and owners[t] != owners[t - 1] and owners[t - 1] >= 0:
            axes.axvline(t - 0.5, color="white", linestyle="--", linewidth=1.5)
    return figure


register_experiment(Experiment(
    method="xlora", settings_cls=XLoRASettings, run=run,
    description="One LoRA expert per character task, then PEFT's X-LoRA over the frozen experts: only its "
                "classifier trains, on the tasks mixed. Look at the per-token scalings on one input that holds "
                "every task in turn (they should follow the segment), the mean scalings per task, and the accuracy "
                "of X-LoRA against each expert alone.",
))
