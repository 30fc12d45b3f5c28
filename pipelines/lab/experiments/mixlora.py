"""MixLoRA on four character tasks at once: where the router sends each task's tokens, with and without the
load-balance loss, and multi-task quality against one LoRA with the same number of trainable parameters.

The tiny Llama learns copy, reverse, sort and add-mod-10 from one mixed training set. MixLoRA puts E LoRA experts
in each feed-forward block (top-k routing, the paper's form) and plain LoRA on the query and value projections;
it is trained twice from the same start, once with the auxiliary load-balance loss (coefficient c) and once
without (c = 0). A single LoRA on the same projections, its rank chosen so that it trains as many numbers, is the
baseline. The figures show each variant's expert load per task and layer (the share of token slots routed to each
expert on the test sets), how uneven the load is during training, and the token accuracy per task.

The default c is larger than the official code's 0.001 (its README example uses 0.01): a run of a few hundred
steps needs a stronger push to show the loss at work. It is a setting.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.adapters import (
    LoRAConfig,
    MixLoRAConfig,
    add_adapter,
    count_parameters,
    mixlora_aux_loss,
    mixlora_expert_loads,
    trainable_parameters,
)
from pipelines.adapters.mixlora import is_swiglu
from pipelines.lab import Experiment, LabResult, LabSettingsError, Progress, register_experiment
from pipelines.lab.experiments._tasks import (
    MultiTaskSettings,
    accuracy_report,
    language_model,
    mixed_tasks,
    spread,
    task_accuracies,
    task_tests,
    trailing_mean,
)
from pipelines.lab.models import attention_targets, mlp_targets
from pipelines.lab.plots import heatmap, line_plot
from pipelines.lab.training import fit, lm_loss, seeded

NAME = "mix"


@dataclass
class MixLoRASettings(MultiTaskSettings):
    num_experts: int = field(default=4, metadata={
        "help": "E, LoRA experts per feed-forward block", "label": "Experts", "min": 2, "max": 16})
    top_k: int = field(default=2, metadata={
        "help": "experts each token is routed to (the paper: 2); at most the number of experts",
        "label": "Top-k", "min": 1, "max": 16})
    rank: int = field(default=4, metadata={
        "help": "rank of every expert and of the attention LoRA (alpha = 2 r)", "label": "Rank", "min": 1, "max": 64})
    aux_coef: float = field(default=0.05, metadata={
        "help": "c, the load-balance loss coefficient of the balanced run (official code 0.001, README 0.01)",
        "label": "Balance loss c", "min": 0.0, "max": 10.0})
    steps: int = field(default=200, metadata={"help": "training steps per variant", "label": "Steps",
                                              "min": 1, "max": 5000})

    @classmethod
    def quick(cls) -> MixLoRASettings:
        # Forty steps leave the routers close to their start; a strong c shows the loss at work that early.
        return cls(steps=40, train_per_task=48, test_per_task=24, batch_size=16, aux_coef=1.0)

    def validate(self) -> None:
        super().validate()
        if self.top_k > self.num_experts:
            raise LabSettingsError(f"top_k must be at most the number of experts ({self.num_experts}), "
                                   f"not {self.top_k}")


def load_balance(loads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """How uneven the expert loads are: the coefficient of variation across experts (0 = every expert the same
    share) averaged over the layers, and the smallest share any expert gets in any layer."""
    cv = [spread(v) for v in loads.values()]
    return sum(cv) / len(cv), min(float(v.min()) for v in loads.values())


@torch.no_grad()
def loads_on(model: nn.Module, data) -> dict[str, torch.Tensor]:
    model.eval()
    model(input_ids=data.input_ids, attention_mask=data.attention_mask)
    return mixlora_expert_loads(model, NAME, data.attention_mask)


def _train_mixlora(base: nn.Module, settings: MixLoRASettings, coef: float, blocks: list[str], train,
                   progress: Progress) -> tuple[nn.Module, list[float]]:
    model = copy.deepcopy(base)
    config = MixLoRAConfig(num_experts=settings.num_experts, top_k=settings.top_k, rank=settings.rank,
                           alpha=2.0 * settings.rank, dropout=0.0, router_aux_loss_coef=coef,
                           target_modules=attention_targets(model, ("q", "v")) + blocks)
    with seeded(settings.seed + 1):
        add_adapter(model, config, NAME)
    imbalance: list[float] = []

    def loss(m: nn.Module, batch) -> torch.Tensor:
        task = lm_loss(m, batch)
        imbalance.append(load_balance(mixlora_expert_loads(m, NAME, batch.attention_mask))[0])
        return task + mixlora_aux_loss(m, NAME, batch.attention_mask)

    fit(model, trainable_parameters(model, NAME), loss, train, settings.steps, settings.learning_rate, progress,
        batch_size=settings.batch_size, seed=settings.seed,
        message=f"MixLoRA {'with' if coef else 'without'} the balance loss")
    model.eval()
    return model, imbalance


def run(settings: MixLoRASettings, progress: Progress) -> LabResult:
    progress.update(0.0, "loading the language model")
    base, tokenizer = language_model(settings.model_id)
    blocks = [name for name, module in base.named_modules() if name and is_swiglu(module)]
    if not blocks:
        raise LabSettingsError(f"{type(base).__name__} has no gated feed-forward blocks (gate/up/down_proj) for "
                               "MixLoRA's experts; use a Llama-style model")
    tasks = list(settings.tasks)
    train = mixed_tasks(tasks, "train", settings.train_per_task, settings.seed, tokenizer)
    tests = task_tests(tasks, settings.test_per_task, settings.seed, tokenizer)
    everything = mixed_tasks(tasks, "test", settings.test_per_task, settings.seed, tokenizer)

    balanced, imbalance_with = _train_mixlora(base, settings, settings.aux_coef, blocks, train,
                                           progress.span(0.02, 0.42))
    free, imbalance_without = _train_mixlora(base, settings, 0.0, blocks, train, progress.span(0.42, 0.82))
    budget = count_parameters(balanced, NAME)

    # One LoRA on the same projections (attention q, v and the blocks' gate/up/down), as many numbers as MixLoRA.
    lora = copy.deepcopy(base)
    lora_targets = attention_targets(lora, ("q", "v")) + mlp_targets(lora)
    per_rank = sum(m.in_features + m.out_features for n, m in lora.named_modules()
                   if n and any(n == t or n.endswith("." + t) for t in lora_targets) and hasattr(m, "in_features"))
    lora_rank = max(1, round(budget / per_rank))
    with seeded(settings.seed + 1):
        add_adapter(lora, LoRAConfig(rank=lora_rank, scale=2.0, target_modules=lora_targets), NAME)
    fit(lora, trainable_parameters(lora, NAME), lm_loss, train, settings.steps, settings.learning_rate,
        progress.span(0.82, 0.97), batch_size=settings.batch_size, seed=settings.seed,
        message=f"LoRA rank {lora_rank} (the same budget)")
    lora.eval()

    progress.update(0.97, "scoring each task and reading the routers")
    variants = {"base": ("base model", base), "with": (f"MixLoRA, c = {settings.aux_coef:g}", balanced),
                "without": ("MixLoRA, c = 0", free), "lora": (f"LoRA r={lora_rank}", lora)}
    labels = {key: label for key, (label, _) in variants.items()}
    accuracy_metrics, rows, accuracy_figure = accuracy_report(
        labels, {key: task_accuracies(model, tests) for key, (_, model) in variants.items()}, tasks)
    loads = {key: {task: loads_on(model, tests[task]) for task in tasks} | {"all tasks": loads_on(model, everything)}
             for key, model in (("with", balanced), ("without", free))}
    balance = {key: load_balance(loads[key]["all tasks"]) for key in loads}

    metrics: dict[str, float] = {"parameters_mixlora": float(budget), "parameters_lora": float(count_parameters(
        lora, NAME)), "lora_rank": float(lora_rank), **accuracy_metrics}
    for key in loads:
        metrics[f"load_cv_{key}"], metrics[f"min_load_{key}"] = balance[key]
        metrics[f"final_train_cv_{key}"] = sum((imbalance_with if key == "with" else imbalance_without)[-10:]) / min(
            10, settings.steps)

    columns = [f"L{i} e{e}" for i in range(len(blocks)) for e in range(settings.num_experts)]
    figures = {
        f"expert_load_{key}_balance_loss": heatmap(
            [torch.cat([loads[key][row][b] for b in loads[key][row]]).tolist() for row in [*tasks, "all tasks"]],
            title=f"Expert load per task, {variants[key][0]}", xlabel="feed-forward layer and expert",
            ylabel="task", row_labels=[*tasks, "all tasks"], col_labels=columns,
            colorbar_label="share of token slots", annotate=len(columns) <= 12)
        for key in ("with", "without")}
    figures["load_imbalance_during_training"] = line_plot(
        {variants["with"][0]: trailing_mean(imbalance_with),
         variants["without"][0]: trailing_mean(imbalance_without)}, markers=False,
        title="How uneven the expert load is in each training batch", xlabel="training step",
        ylabel="coefficient of variation of the loads")
    figures["accuracy_per_task"] = accuracy_figure
    for row, (key, (_, model)) in zip(rows, variants.items(), strict=True):
        row["trainable parameters"] = 0 if key == "base" else int(count_parameters(model, NAME))
        if key in balance:
            row["load CV (all tasks)"], row["smallest expert load"] = (round(v, 3) for v in balance[key])
    summary = (
        f"On the test tokens of the {len(tasks)} tasks, MixLoRA trained with the balance loss (c = {settings.aux_coef:g}) spreads "
        f"its token slots with a coefficient of variation of {balance['with'][0]:.2f} across experts (smallest "
        f"expert load {balance['with'][1]:.2f}; an even split is {1 / settings.num_experts:.2f}); without it "
        f"(c = 0) the spread is {balance['without'][0]:.2f} (smallest {balance['without'][1]:.2f}). Mean token "
        f"accuracy: base {metrics['mean_accuracy_base']:.3f}, MixLoRA {metrics['mean_accuracy_with']:.3f} "
        f"(c = 0: {metrics['mean_accuracy_without']:.3f}), and one LoRA of rank {lora_rank} with "
        f"{int(metrics['parameters_lora']):,} trainable numbers against MixLoRA's {budget:,}: "
        f"{metrics['mean_accuracy_lora']:.3f}."
    )
    return LabResult(method="mixlora", summary=summary, metrics=metrics, tables={"variants": rows},
                     figures=figures, settings=settings.to_dict())


register_experiment(Experiment(
    method="mixlora", settings_cls=MixLoRASettings, run=run,
    description="The tiny Llama learns four character tasks at once with MixLoRA (LoRA experts in each "
                "feed-forward block behind a top-k router), trained with and without the load-balance loss, and "
                "with one LoRA of the same size. Look at the expert load maps (how evenly each variant uses its "
                "experts, per task), the imbalance during training, and the accuracy per task.",
))
