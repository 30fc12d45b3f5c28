"""GS-LoRA / GS-LoRA++: forgetting chosen digit classes task after task while the other classes stay.

The tiny ViT, pre-trained on upright handwritten digits, is first trained with a linear head into a 10-class
digit classifier (the "pre-trained model" of the paper). Then a sequence of forgetting tasks: each adds a
GS-LoRA adapter on the feed-forward layers of every block (the adapters of earlier tasks stay on, frozen, as the
official code merges them) and trains it with GS-LoRA's loss: cross-entropy on the classes still to be kept,
the bounded hinge pushing the task's classes up to BND, and the group lasso over the blocks (a proximal step or a
loss term), switched on after a warm-up. GS-LoRA++ (`prototypes`) adds the prototype hinge on the forgotten
samples' features. After each task the test accuracy is measured on the classes forgotten so far and on the
rest, and each block's group norm is recorded with the groups that ended exactly zero: the blocks that task did
not change.

Lab choices (the papers' loss scales belong to a CosFace head of scale 64 on face identities): a plain softmax
head, BND 4 (above the cross-entropy of a uniform guess over 10 classes, ln 10 = 2.3), beta 0.5, the group lasso
weight and warm-up counted in steps, AdamW at 1e-2 for the forgetting tasks (the LoRA update is scaled by 1/r,
so a smaller rate barely moves it in a few dozen steps). With AdamW the official group lasso in the loss only
shrinks the groups a task does not need, never to zero, so the lab's default `sparsity="proximal"` takes the
group lasso as a proximal step in Adam's step size after each AdamW step (`AdamGroupProximal`: block
soft-thresholding of each group by lr * alpha / sqrt(v_hat_g)); groups the task does not use go to exactly
zero, every entry of their A and B, and the heat map hatches them. The group lasso weight sets how many:
alpha 0.03 zeroes one to three of the four blocks in most tasks (seeds 0 to 2, default and quick settings); too
large a weight zeroes every group, and a task whose groups are all zero forgets nothing (a zero LoRA has no
gradient), so raise it with care. `sparsity="penalty"` runs the official loss term. The remaining batch is drawn
from the classes still kept (the official replay of a few remaining samples); earlier tasks' forgotten classes
are not replayed, as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import nn

from pipelines.adapters import (
    AdamGroupProximal,
    AdapterError,
    GSLoRAConfig,
    add_adapter,
    check_forget_classes,
    class_prototypes,
    forgetting_loss,
    group_lasso,
    group_lasso_weight,
    group_norms,
    layers_of,
    trainable_parameters,
    zero_groups,
)
from pipelines.adapters.gs_lora import DISTANCES, block_of
from pipelines.lab import Experiment, LabResult, LabSettings, LabSettingsError, Progress, register_experiment
from pipelines.lab.data import LabData, digits
from pipelines.lab.models import ImageClassifier, load_backbone, mlp_targets
from pipelines.lab.plots import heatmap, line_plot
from pipelines.lab.training import classification_loss, fit, predictions, seeded

SPARSITY = ("penalty", "proximal")
NUM_CLASSES = 10


@dataclass
class GSLoRASettings(LabSettings):
    forget_classes: tuple[int, ...] = field(default=(0, 1, 2, 3, 4, 5), metadata={
        "help": "the digit classes to forget, in order", "label": "Classes to forget"})
    classes_per_task: int = field(default=2, metadata={
        "help": "classes forgotten by each task (the sequence is cut into tasks of this many)",
        "label": "Classes per task", "min": 1, "max": 9})
    rank: int = field(default=8, metadata={"help": "LoRA rank (official: 8)", "label": "Rank", "min": 1, "max": 64})
    sparsity: str = field(default="proximal", metadata={
        "help": "the group lasso as a proximal step in Adam's step size, which zeroes groups exactly, or as a "
                "loss term (official 'penalty': groups only shrink)",
        "label": "Group sparsity", "choices": SPARSITY})
    alpha: float = field(default=0.03, metadata={
        "help": "group lasso weight after the warm-up (the proximal threshold is lr * alpha / sqrt(v) per group)",
        "label": "Group lasso weight", "min": 0.0, "max": 1000.0})
    warmup_steps: int = field(default=20, metadata={
        "help": "steps of each task without the group lasso (official: 20 epochs)", "label": "Warm-up steps",
        "min": 0, "max": 5000})
    beta: float = field(default=0.5, metadata={"help": "weight of the forgetting hinge", "label": "Beta",
                                               "min": 0.0, "max": 100.0})
    bnd: float = field(default=4.0, metadata={
        "help": "the forgotten classes' cross-entropy is pushed up to this bound", "label": "BND",
        "min": 0.0, "max": 100.0})
    prototypes: bool = field(default=False, metadata={
        "help": "GS-LoRA++: add the prototype hinge on the forgotten samples' features", "label": "GS-LoRA++"})
    prototype_weight: float = field(default=1.0, metadata={
        "help": "GS-LoRA++: weight of the prototype hinge", "label": "Prototype weight", "min": 0.0, "max": 100.0})
    bnd_pro: float = field(default=0.05, metadata={
        "help": "GS-LoRA++: forgotten features are pushed at least this far from their prototype",
        "label": "BND (prototypes)", "min": 0.0, "max": 100.0})
    distance: str = field(default="kl", metadata={"help": "GS-LoRA++: the feature-to-prototype distance",
                                                  "label": "Distance", "choices": DISTANCES})
    classifier_steps: int = field(default=150, metadata={
        "help": "steps training the digit classifier before any forgetting", "label": "Classifier steps",
        "min": 1, "max": 5000})
    steps_per_task: int = field(default=80, metadata={"help": "steps of each forgetting task",
                                                      "label": "Steps per task", "min": 1, "max": 5000})
    classifier_learning_rate: float = field(default=3e-3, metadata={
        "help": "AdamW learning rate of the digit classifier", "label": "Classifier learning rate",
        "min": 1e-6, "max": 1.0})
    learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the forgetting tasks",
                                                         "label": "Learning rate", "min": 1e-6, "max": 1.0})
    batch_size: int = field(default=64, metadata={"help": "samples per step (each of remaining and forgotten)",
                                                  "label": "Batch size", "min": 1, "max": 1024})

    @classmethod
    def quick(cls) -> GSLoRASettings:
        # The forgetting tasks keep the default steps and warm-up: with fewer, which groups go to zero
        # depends on the seed (none, or every group and then no forgetting).
        return cls(forget_classes=(0, 1), classes_per_task=1, classifier_steps=80)

    def validate(self) -> None:
        super().validate()
        try:
            check_forget_classes(list(self.forget_classes), NUM_CLASSES)
        except AdapterError as error:
            raise LabSettingsError(f"forget_classes: {error}") from None
        if len(self.forget_classes) >= NUM_CLASSES:
            raise LabSettingsError(f"forget_classes must leave at least one of the {NUM_CLASSES} classes to keep")

    def tasks(self) -> list[tuple[int, ...]]:
        classes = list(self.forget_classes)
        return [tuple(classes[i:i + self.classes_per_task]) for i in range(0, len(classes), self.classes_per_task)]


def _subset(data: LabData, classes: set[int]) -> LabData:
    keep = torch.tensor([int(label) in classes for label in data.labels])
    return data.take(keep.nonzero().squeeze(1))


def _features(classifier: ImageClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised feature, logits): the [CLS] token before the head, as the official prototype terms use it."""
    hidden = classifier.vit(pixel_values=images).last_hidden_state[:, 0]
    return F.normalize(hidden, dim=-1), classifier.head(hidden)


def _class_accuracy(model: nn.Module, data: LabData) -> list[float]:
    hits = predictions(model, data) == data.labels
    return [float(hits[data.labels == c].float().mean()) for c in range(NUM_CLASSES)]


def run(settings: GSLoRASettings, progress: Progress) -> LabResult:
    tasks = settings.tasks()
    progress.update(0.0, "loading the ViT and the digits")
    with seeded(settings.seed):
        model = ImageClassifier(load_backbone("vit", settings.model_id), NUM_CLASSES)
    train, test = digits("train"), digits("test")
    share = 1.0 / (len(tasks) + 1)
    fit(model, model.parameters(), classification_loss, train, settings.classifier_steps,
        settings.classifier_learning_rate,
        progress.span(0.0, share), batch_size=settings.batch_size, seed=settings.seed,
        message="training the digit classifier")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    per_class = [_class_accuracy(model, test)]
    forgotten: set[int] = set()
    norms: list[dict[str, float]] = []
    zeros: list[list[str]] = []
    updates: list[dict[str, float]] = []
    curves: dict[str, list[float]] = {}
    for t, task in enumerate(tasks, start=1):
        kept = set(range(NUM_CLASSES)) - forgotten - set(task)
        name = f"task{t}"
        with seeded(settings.seed + t):
            add_adapter(model, GSLoRAConfig(rank=settings.rank, target_modules=mlp_targets(model.vit)), name)
        prototypes = None
        if settings.prototypes:
            with torch.no_grad():
                features = _features(model, train.inputs)[0]
            prototypes = class_prototypes(features, train.labels, NUM_CLASSES)
        curves[f"task {t}"] = _forget(model, name, _subset(train, kept), _subset(train, set(task)), prototypes,
                                      settings, progress.span(t * share, (t + 1) * share),
                                      f"task {t}: forgetting {', '.join(map(str, task))}")
        forgotten |= set(task)
        per_class.append(_class_accuracy(model, test))
        norms.append(group_norms(model, name))
        zeros.append(zero_groups(model, name))
        updates.append(update_norms(model, name))
    return _result(settings, tasks, per_class, norms, zeros, updates, curves)


@torch.no_grad()
def update_norms(model: nn.Module, name: str) -> dict[str, float]:
    """{block: the Frobenius norm of the weight change adapter `name` makes in it}: zero where the block is
    unchanged, whatever its LoRA's A holds."""
    squares: dict[str, float] = {}
    for module, stack in layers_of(model, name).items():
        block = block_of(module)
        squares[block] = squares.get(block, 0.0) + float(stack[0].get_delta_weight().float().pow(2).sum())
    return {block: math.sqrt(value) for block, value in squares.items()}


def _forget(model: ImageClassifier, name: str, remain: LabData, forget: LabData, prototypes: torch.Tensor | None,
            settings: GSLoRASettings, progress: Progress, message: str) -> list[float]:
    step = [0]
    params = trainable_parameters(model, name)
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.05)  # the official decay
    proximal = AdamGroupProximal(model, name, optimizer)

    def draw(generator: torch.Generator) -> tuple[LabData, LabData]:
        pick = [data.take(torch.randint(len(data), (settings.batch_size,), generator=generator))
                for data in (remain, forget)]
        return pick[0], pick[1]

    def loss_fn(model: ImageClassifier, batch: tuple[LabData, LabData]) -> torch.Tensor:
        (remain_f, remain_logits), (forget_f, forget_logits) = (_features(model, part.inputs) for part in batch)
        alpha = group_lasso_weight(step[0], settings.alpha, settings.warmup_steps)
        structure = group_lasso(model, name) if settings.sparsity == "penalty" and alpha else 0.0
        return forgetting_loss(
            remain_logits, batch[0].labels, forget_logits, batch[1].labels, beta=settings.beta, bnd=settings.bnd,
            structure=structure, alpha=alpha, remain_features=remain_f, forget_features=forget_f,
            prototypes=prototypes, prototype_forget_weight=settings.prototype_weight, bnd_pro=settings.bnd_pro,
            distance=settings.distance)["total"]

    def on_step(done: int, loss: float) -> None:
        step[0] = done
        alpha = group_lasso_weight(done, settings.alpha, settings.warmup_steps)
        if settings.sparsity == "proximal":
            proximal.step(alpha)

    return fit(model, params, loss_fn, draw, settings.steps_per_task, settings.learning_rate, progress,
               weight_decay=0.05, seed=settings.seed, message=message, on_step=on_step, optimizer=optimizer)


def _result(settings: GSLoRASettings, tasks: list[tuple[int, ...]], per_class: list[list[float]],
            norms: list[dict[str, float]], zeros: list[list[str]], updates: list[dict[str, float]],
            curves: dict[str, list[float]]) -> LabResult:
    stages = ["before"] + [f"after task {t}" for t in range(1, len(tasks) + 1)]
    forgotten_acc, kept_acc, rows, metrics = [], [], [], {}
    forgotten: set[int] = set()
    for stage, accuracies in enumerate(per_class):
        if stage:
            forgotten |= set(tasks[stage - 1])
        kept = [c for c in range(NUM_CLASSES) if c not in set(settings.forget_classes)]
        gone = sorted(forgotten) or list(settings.forget_classes)
        forgotten_acc.append(sum(accuracies[c] for c in gone) / len(gone))
        kept_acc.append(sum(accuracies[c] for c in kept) / len(kept))
        rows.append({"stage": stages[stage], "classes forgotten": ", ".join(map(str, sorted(forgotten))) or "none",
                     "accuracy on forgotten classes": round(forgotten_acc[-1], 4),
                     "accuracy on classes never forgotten": round(kept_acc[-1], 4)})
        metrics[f"forgotten_accuracy_{stage}"] = forgotten_acc[-1]
        metrics[f"kept_accuracy_{stage}"] = kept_acc[-1]
    blocks = list(norms[0])
    matrix = [[task_norms[b] for b in blocks] for task_norms in norms]
    changes = [[task_updates[b] for b in blocks] for task_updates in updates]
    for t, (row, change) in enumerate(zip(matrix, changes, strict=True), start=1):
        for b, value, delta in zip(blocks, row, change, strict=True):
            metrics[f"group_norm_task{t}_{_short(b)}"] = value
            metrics[f"update_norm_task{t}_{_short(b)}"] = delta
            metrics[f"zero_group_task{t}_{_short(b)}"] = float(b in zeros[t - 1])
        metrics[f"zero_groups_task{t}"] = float(len(zeros[t - 1]))
    metrics["final_forgotten_accuracy"], metrics["final_kept_accuracy"] = forgotten_acc[-1], kept_acc[-1]
    group_rows = [{"task": f"task {t}", **{_short(b): round(v, 5) for b, v in zip(blocks, row, strict=True)},
                   "groups exactly zero": ", ".join(map(_short, zero)) or "none"}
                  for t, (row, zero) in enumerate(zip(matrix, zeros, strict=True), start=1)]
    figures = {
        "accuracy_by_task": _whole_ticks(line_plot(
            {"classes forgotten so far (before: all to be forgotten)": forgotten_acc,
             "classes never forgotten": kept_acc},
            x=list(range(len(stages))), ylim=(0.0, 1.05), title="Test accuracy task by task",
            xlabel="forgetting tasks done", ylabel="accuracy")),
        "class_accuracy": heatmap(per_class, row_labels=stages, col_labels=[str(c) for c in range(NUM_CLASSES)],
                                  title="Accuracy of each digit class", xlabel="class", ylabel="",
                                  colorbar_label="accuracy"),
        "group_norms": _mark_zeros(heatmap(
            matrix, row_labels=[f"task {t}" for t in range(1, len(tasks) + 1)], col_labels=[_short(b) for b in blocks],
            colorbar_label="||theta_g||", title="Group norm of each block's LoRA (hatched: exactly zero)",
            xlabel="block", ylabel=""), [[b in zero for b in blocks] for zero in zeros]),
        "update_norms": heatmap(changes, row_labels=[f"task {t}" for t in range(1, len(tasks) + 1)],
                                col_labels=[_short(b) for b in blocks], colorbar_label="||delta W||_F",
                                title="How much each task changed each block's weights (0: unchanged)",
                                xlabel="block", ylabel=""),
        "training": line_plot(curves, markers=False, title="Forgetting loss per step", xlabel="step",
                              ylabel="total loss"),
    }
    summary = (
        f"The digit classifier starts at {forgotten_acc[0]:.0%} on the classes to forget and {kept_acc[0]:.0%} on "
        f"the others. After {len(tasks)} forgetting task(s) ({'; '.join(', '.join(map(str, t)) for t in tasks)}), "
        f"the forgotten classes score {forgotten_acc[-1]:.0%} and the classes never forgotten {kept_acc[-1]:.0%}. "
        f"Groups exactly zero (every entry of the block's A and B; the block is as before the task): "
        + "; ".join(f"task {t}: {', '.join(map(_short, z)) or 'none'}" for t, z in enumerate(zeros, start=1))
        + ". The block each task changed least: "
        + "; ".join(f"task {t}: {_short(blocks[row.index(min(row))])} ({min(row):.2f} against {max(row):.2f} for "
                    f"the most)" for t, row in enumerate(changes, start=1)) + "."
    )
    if not math.isfinite(sum(metrics.values())):
        raise LabSettingsError("the forgetting diverged (a loss or norm is not finite); lower the learning rate")
    return LabResult(method="gs-lora", summary=summary, metrics=metrics,
                     tables={"accuracy": rows, "group norms": group_rows}, figures=figures,
                     settings=settings.to_dict())


def _whole_ticks(figure: Figure) -> Figure:
    figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure


def _mark_zeros(figure: Figure, zero: list[list[bool]]) -> Figure:
    """Hatch and outline the heat map's cells whose group is exactly zero."""
    axes = figure.axes[0]
    for i, row in enumerate(zero):
        for j, is_zero in enumerate(row):
            if is_zero:
                axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="red",
                                         linewidth=2))
    return figure


def _short(block: str) -> str:
    """`vit.encoder.layer.3` -> `block 3`."""
    tail = block.rsplit(".", 1)[-1]
    return f"block {tail}" if tail.isdigit() else block


register_experiment(Experiment(
    method="gs-lora", settings_cls=GSLoRASettings, run=run,
    description="A digit classifier on the tiny ViT forgets chosen classes task after task with GS-LoRA: LoRA on "
                "every block's feed-forward layers, one group per block under a group lasso. Look at the "
                "accuracy on the forgotten classes falling while the others stay, and at which blocks' groups "
                "stay at zero.",
))
