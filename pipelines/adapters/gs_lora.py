"""GS-LoRA and GS-LoRA++: group-sparse LoRA for continual forgetting of chosen classes.

    L = CE(remaining) + beta * ReLU(BND - CE(forgotten)) + alpha * sum_g ||theta_g||_2
        (GS-LoRA++ adds)  + w_f * ReLU(BND_pro - d(f_forgotten, p_y)) + w_r * d(f_remaining, p_y)

Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024 (arXiv 2403.11530), and "Practical
Continual Forgetting for Pre-trained Vision Models", T-PAMI 2026 (arXiv 2501.09705, GS-LoRA++); official code
bjzhb666/GS-LoRA (engine_cl.py, train/train_own_forget_cl.py, util/args.py, scripts/run_cl_forget.sh). Each
forgetting task trains a LoRA on both Linear layers of every feed-forward block; the LoRA modules of one
transformer block form one group, and the group lasso (the sum over groups of the L2 norm of all their
entries, no size weighting) drives whole groups to zero, so only a few blocks change. The data term keeps the
cross-entropy on the remaining classes and pushes the forgotten classes' cross-entropy up to a bound BND (a
hinge, so it cannot run away). GS-LoRA++ measures how far each sample's feature (the backbone's normalised
output before the classifier) lies from its class prototype (the mean feature of the class under the model at
the start of the task) with KL(softmax(p) || softmax(f)) and pushes forgotten samples at least BND_pro away;
the official scripts give remaining samples weight 0.

Defaults follow the official code: rank 8 with loralib's lora_alpha 1 (the update is scaled by 1/r), A
Kaiming-uniform (a = sqrt(5)) and B zero (a new adapter changes nothing); AdamW with weight decay 0.05. The
group-lasso weight has a warm-up: 0 for the first `alpha_epoch` epochs, then `big_alpha` (`--warmup_alpha`,
alpha_epoch 20). The official code adds the group lasso to the loss and lets the optimiser take it with the
rest (a plain penalty, `group_lasso`), and reports each group's norm after a task (`get_norm_of_lora`, logged as
is, with no threshold): under Adam the groups a task does not need shrink towards zero but never reach it.
`proximal_group_step` is the proximal alternative (block soft-thresholding, the exact proximal operator of
alpha * sum_g ||theta_g||), which zeroes a group exactly once its norm falls under the threshold. After a plain
gradient step the threshold is lr * alpha; Adam's step is lr / sqrt(v) per entry, so lr * alpha is far too
small to zero anything after an Adam step, and `AdamGroupProximal` thresholds each group in Adam's step size
instead (lr * alpha / sqrt(v_hat_g), the preconditioned proximal step). In continual forgetting the official code
merges each task's LoRA into the weights and re-initialises it for the next task; here each task adds a new
named adapter and the previous ones stay active and frozen, which computes the same and keeps the original
model reachable (`disabled()`, `remove_adapter`).

Choices the papers leave open, each a setting or an argument:
- `grouping`: "block" (official default: all LoRA modules of one transformer block), "module" (each LoRA a
  group) or "matrix" (each A and B), as the official `get_norm_of_lora` offers. A block is the part of a module's
  name up to its last number (`encoder.layer.3` for `encoder.layer.3.mlp.fc1`); a name without a number is its
  own group.
- `sparsity` of the training loop: "penalty" (official) or "proximal" (`AdamGroupProximal` after each AdamW
  step, the group lasso left out of the loss), which zeroes whole groups exactly; the lab uses "proximal".
- The loss weights (beta, BND, the prototype weights and BND_pro) depend on the classifier's loss scale: the
  official values (beta 0.15, BND 105-110 with a CosFace head of scale 64) do not carry over to a plain
  softmax head, so `forgetting_loss` takes them as arguments and the lab experiment chooses its own.
- Not implemented: the official runs also average weights with an EMA (`--average_weight`) for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.core import AdapterConfig, AdapterError, layers_of, register_method
from pipelines.adapters.fields import check_choice, check_int, check_number
from pipelines.adapters.lora import LoRAConfig, LoRALinear

GROUPINGS = ("block", "module", "matrix")
DISTANCES = ("kl", "l2")


@dataclass
class GSLoRAConfig(AdapterConfig):
    """LoRA on the feed-forward Linear layers (`target_modules`, e.g. `mlp_targets(model)`), grouped for the
    group lasso."""

    method = "gs-lora"

    rank: int = field(default=8, metadata={"help": "rank r of each LoRA (official: 8)"})
    lora_alpha: float = field(default=1.0, metadata={
        "help": "the update is scaled by lora_alpha / r (loralib's default 1, as the official code)"})
    grouping: str = field(default="block", metadata={
        "help": "group lasso groups: all LoRAs of a block ('block', official), each LoRA, or each matrix",
        "choices": list(GROUPINGS)})

    def validate(self) -> None:
        check_int("GS-LoRA", "rank", self.rank)
        check_number("GS-LoRA", "lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_choice("GS-LoRA", "grouping", self.grouping, GROUPINGS)


class GSLoRALinear(LoRALinear):
    """loralib's Linear: `lora_A` (r, d_in) Kaiming-uniform (a = sqrt(5)), `lora_B` (d_out, r) zero, update
    (alpha / r) B A; the lab's LoRA layer with loralib's initialisation of A."""

    def __init__(self, base_layer: nn.Module, config: GSLoRAConfig | None = None,
                 adapter_name: str = "default") -> None:
        config = config or GSLoRAConfig()
        super().__init__(base_layer, LoRAConfig(rank=config.rank, scale=float(config.lora_alpha) / config.rank),
                         adapter_name)
        self.config = config
        with torch.no_grad():
            down = torch.empty(self.lora_A.shape)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.lora_A.copy_(down)


GSLoRAConfig.layer_cls = GSLoRALinear


# -- groups ---------------------------------------------------------------------------------------------------


def block_of(module_name: str) -> str:
    """The block a module belongs to: its name up to the last number (`layers.3` in `layers.3.mlp.fc1`)."""
    parts = module_name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:numbered[-1] + 1]) if numbered else module_name


def lora_groups(model: nn.Module, name: str) -> dict[str, list[nn.Parameter]]:
    """{group: its parameters} of GS-LoRA adapter `name`, in the model's order, grouped as its config says."""
    layers = {module: stack[0] for module, stack in layers_of(model, name).items()}
    if not layers or not all(isinstance(layer, GSLoRALinear) for layer in layers.values()):
        raise AdapterError(f"the model has no GS-LoRA adapter named {name!r}")
    grouping = next(iter(layers.values())).config.grouping
    groups: dict[str, list[nn.Parameter]] = {}
    for module, layer in layers.items():
        if grouping == "block":
            groups.setdefault(block_of(module), []).extend([layer.lora_A, layer.lora_B])
        elif grouping == "module":
            groups[module] = [layer.lora_A, layer.lora_B]
        else:
            groups[f"{module}.lora_A"], groups[f"{module}.lora_B"] = [layer.lora_A], [layer.lora_B]
    return groups


def _norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(p.float().pow(2).sum() for p in params))


def group_lasso(model: nn.Module, name: str) -> torch.Tensor:
    """sum_g ||theta_g||_2 over the groups of adapter `name` (the official `get_structure_loss`), differentiable."""
    return sum(_norm(params) for params in lora_groups(model, name).values())


@torch.no_grad()
def group_norms(model: nn.Module, name: str) -> dict[str, float]:
    """{group: ||theta_g||_2}: which groups the forgetting used (a zero norm: the block is unchanged)."""
    return {group: float(_norm(params)) for group, params in lora_groups(model, name).items()}


@torch.no_grad()
def zero_groups(model: nn.Module, name: str) -> list[str]:
    """The groups of adapter `name` whose every entry (each A and B) is exactly zero: blocks it leaves as they
    were, whatever the rest of the model does."""
    return [group for group, params in lora_groups(model, name).items()
            if all(not bool(p.any()) for p in params)]


def _check_threshold(threshold: object) -> float:
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
            and threshold >= 0):
        raise AdapterError(f"the proximal threshold must be a finite number of at least 0, not {threshold!r}")
    return float(threshold)


@torch.no_grad()
def proximal_group_step(model: nn.Module, name: str, threshold: float | Mapping[str, float]) -> list[str]:
    """Block soft-thresholding, the proximal operator of `threshold * sum_g ||theta_g||`: each group is scaled by
    max(0, 1 - threshold / ||theta_g||), so groups with a norm at or under `threshold` become exactly zero.
    `threshold` is one number for every group or {group: threshold}. After a plain gradient step the exact
    proximal step takes threshold = learning rate * alpha; after an Adam step see `AdamGroupProximal`.
    Returns the groups now zero."""
    groups = lora_groups(model, name)
    thresholds = ({group: _check_threshold(threshold[group]) for group in groups}
                  if isinstance(threshold, Mapping) else dict.fromkeys(groups, _check_threshold(threshold)))
    zero = []
    for group, params in groups.items():
        norm = float(_norm(params))
        factor = max(0.0, 1.0 - thresholds[group] / norm) if norm > 0 else 0.0
        for p in params:
            p.mul_(factor)
        if factor == 0.0:
            zero.append(group)
    return zero


class AdamGroupProximal:
    """The group lasso as a proximal step after each Adam(W) step, in Adam's own step size.

    Adam divides each gradient by the root of its running second moment v, so its effective learning rate is
    lr / sqrt(v), not lr; the proximal step of alpha * sum_g ||theta_g|| then takes a threshold of
    lr * alpha / sqrt(v) (proximal Adam: the preconditioned proximal gradient method, as ProxGen, Yun et al.,
    NeurIPS 2021). Block soft-thresholding has a closed form only for one step size per group, so each group
    takes lr * alpha / (sqrt(mean_g v_hat) + eps), its gradients' bias-corrected root mean square: a group the
    data term barely needs has small gradients and so a large threshold, and goes to exactly zero, while a
    group it needs keeps a small one. Call `step(alpha)` after each step of `optimizer` (a torch Adam or AdamW
    holding the adapter's parameters): v, its step count, lr, beta2 and eps are read from the optimiser itself,
    so they are the ones it used (a learning-rate schedule included). Returns the groups now zero."""

    def __init__(self, model: nn.Module, name: str, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.name, self.optimizer = model, name, optimizer
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def thresholds(self, alpha: float) -> dict[str, float]:
        """{group: lr * alpha / (sqrt(v_hat_g) + eps)} from the optimiser's second moments after its last step."""
        out = {}
        for block, params in lora_groups(self.model, self.name).items():
            settings = self._group_of[id(params[0])]
            states = [self.optimizer.state.get(p, {}) for p in params]
            square = sum(float(s["exp_avg_sq"].float().sum()) for s in states if "exp_avg_sq" in s)
            steps = max([int(s["step"]) for s in states if "step" in s] or [1])
            v = square / sum(p.numel() for p in params) / (1.0 - settings["betas"][1] ** steps)
            out[block] = settings["lr"] * alpha / (math.sqrt(v) + settings["eps"])
        return out

    def step(self, alpha: float) -> list[str]:
        return proximal_group_step(self.model, self.name, self.thresholds(alpha)) if alpha else []


def group_lasso_weight(epoch: int, big_alpha: float, alpha_epoch: int = 20) -> float:
    """The official warm-up (`--warmup_alpha`): no group lasso for the first `alpha_epoch` epochs, then
    `big_alpha`. The lab counts steps instead of epochs."""
    return 0.0 if epoch < alpha_epoch else float(big_alpha)


# -- the data terms --------------------------------------------------------------------------------------------


def bounded_forget_loss(logits: torch.Tensor, labels: torch.Tensor, bnd: float) -> torch.Tensor:
    """ReLU(BND - CE(logits, labels)): raise the forgotten classes' cross-entropy, but only up to BND."""
    return F.relu(bnd - F.cross_entropy(logits, labels))


@torch.no_grad()
def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, d): the mean feature of each class (zero for a class without samples)."""
    sums = torch.zeros(num_classes, features.shape[-1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def prototype_distance(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                       distance: str = "kl") -> torch.Tensor:
    """The official `get_prototype_loss`: "kl" is KL(softmax(p_y) || softmax(f)) averaged over the batch,
    "l2" the mean squared difference."""
    check_choice("GS-LoRA++", "distance", distance, DISTANCES)
    targets = prototypes[labels].to(features)
    if distance == "l2":
        return (features - targets).pow(2).mean()
    return F.kl_div(F.log_softmax(features, dim=-1), F.log_softmax(targets, dim=-1), reduction="batchmean",
                    log_target=True)


def forgetting_loss(remain_logits: torch.Tensor, remain_labels: torch.Tensor, forget_logits: torch.Tensor,
                    forget_labels: torch.Tensor, *, beta: float, bnd: float, structure: torch.Tensor | float = 0.0,
                    alpha: float = 0.0, remain_features: torch.Tensor | None = None,
                    forget_features: torch.Tensor | None = None, prototypes: torch.Tensor | None = None,
                    prototype_forget_weight: float = 0.0, prototype_remain_weight: float = 0.0,
                    bnd_pro: float = 0.0, distance: str = "kl") -> dict[str, torch.Tensor]:
    """GS-LoRA's loss (and GS-LoRA++'s with `prototypes`): {"total", "remain", "forget", "structure",
    "prototype"}. `structure` is `group_lasso(model, name)` (pass 0 with the proximal step)."""
    parts = {"remain": F.cross_entropy(remain_logits, remain_labels),
             "forget": beta * bounded_forget_loss(forget_logits, forget_labels, bnd),
             "structure": alpha * torch.as_tensor(structure, dtype=remain_logits.dtype)}
    prototype = remain_logits.new_zeros(())
    if prototypes is not None:
        if forget_features is None or remain_features is None:
            raise AdapterError("GS-LoRA++ needs the features of both batches with prototypes")
        prototype = (prototype_forget_weight * F.relu(bnd_pro - prototype_distance(
            forget_features, forget_labels, prototypes, distance))
            + prototype_remain_weight * prototype_distance(remain_features, remain_labels, prototypes, distance))
    parts["prototype"] = prototype
    parts["total"] = parts["remain"] + parts["forget"] + parts["structure"] + prototype
    return parts


def check_forget_classes(classes: Iterable[int], num_classes: int) -> list[int]:
    """The classes to forget, checked: each an existing class (0 .. num_classes - 1), none twice."""
    chosen = list(classes)
    if not chosen:
        raise AdapterError("choose at least one class to forget")
    for c in chosen:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
            raise AdapterError(f"class {c!r} does not exist: the model has classes 0 to {num_classes - 1}")
    if len(set(chosen)) != len(chosen):
        raise AdapterError(f"a class to forget is named twice in {chosen}")
    return chosen


register_method(
    "gs-lora", GSLoRAConfig, title="GS-LoRA / GS-LoRA++",
    paper="Zhao et al., Continual Forgetting for Pre-trained Vision Models, CVPR 2024 (arXiv 2403.11530); "
          "Practical Continual Forgetting for Pre-trained Vision Models, T-PAMI 2026 (arXiv 2501.09705)",
    property="LoRA on the feed-forward layers with a group lasso per block: chosen classes are forgotten task "
             "after task while the rest stay, and most blocks' groups go to zero",
)
