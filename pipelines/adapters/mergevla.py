"""MergeVLA: per-task adapters merged into one set of weights that each task retrieves through a sparse mask,
and a test-time router that picks the task from the first input.

    task vectors      tau_t = theta_t - theta_0                  (each task's adapter folded into its weights)
    task arithmetic   tau_MTL = s * sum_t tau_t                  (s = 1)
    TALL masks        m_t = 1[ |theta_0 - theta_t| > lambda * |theta_MTL - theta_t| ]     (lambda = 0.6)
                          = 1[ |tau_t| > lambda * |tau_MTL - tau_t| ]
    retrieval         theta_t ~ theta_0 + m_t * tau_MTL         (elementwise)
    router            R_t = top-k right singular vectors of task t's weight at a router module (k = 8)
                      score_t = mean over router modules of mean over tokens of ||R_t h||_2, h the module's
                      input when the model runs the first input with task t's mask; softmax over t; argmax

Fu et al., "MergeVLA: Cross-Skill Model Merging Toward a Generalist Vision-Language-Action Agent" (arXiv
2511.18810); official code MergeVLA/MergeVLA @183f02c4. The masks are FusionBench's TALL-mask task arithmetic
(`fusion_bench/method/tall_mask/task_arithmetic.py` and `utils.generate_task_masks`, after Wang et al.,
"Localizing Task Information for Improved Model Merging and Compression", ICML 2024), run with
`tall_mask_lambda=0.6` and task-arithmetic scaling 1.0 by `model_merging/mergy.py`; the merged model stores
tau_MTL and one boolean mask per task. The router is `prismatic/models/moe_model.py` `SmileGate` (||R_e h||_2
per token, averaged over tokens and over its two gates) with routers built by `mergy.create_gate` (the
top-`k_gate` right singular vectors of each expert's `v_adapter` and `v_task` weights in the block before
the expert head, `k_gate=8`); `experiments/robot/libero/run_libero_eval.task_router` scores each candidate
task on the episode's first observation with that task's mask and expert loaded, takes the softmax over the
candidates and keeps the argmax for the episode. The action head's last layer is kept per task as an expert
rather than merged (`action_head_layer_num=1`).

Here the same on any model: `merge_task_adapters` folds existing per-task adapters (LoRA or any mergeable
method) into one MergeVLA adapter, `select_task` retrieves one task (or the plain task-arithmetic sum), and
`route` runs the router. The merged adapter holds tau_MTL (a parameter, `task_vector`), the masks (`masks`, one
0/1 float per weight and task: the core's adapter files carry floating-point tensors), the router
vectors (`router`) on router modules, and on expert modules each task's own update (`task_vectors`).

Choices the paper and code leave open here, each a setting:
- `router_source`: "task-vector" (default) builds R_t from tau_t, "weight" from theta_0 + tau_t. MergeVLA's
  gates come from the weights of action-head layers each expert trained from the same initialisation; on a
  pre-trained layer only tau_t carries what a task learned, and FusionBench's SMILE router, where SmileGate
  comes from, routes on the difference by default (`routing_use_diff=True`). A LoRA's tau_t = B A spans the
  rows of A, which stay close to their random initialisation, so routers on LoRA modules carry little of the
  task; route on fully trained layers (MergeVLA: the action head) where there are some.
- `router_score`: "norm" is MergeVLA's ||R_t h||; "relative" divides by ||h||, so that a candidate whose mask
  makes h larger does not win for that alone (h is computed anew under every candidate's mask).
- `router_modules`: the modules whose inputs the router scores (MergeVLA: the two projections of the block
  before the expert head); None scores every merged module.
- `expert_modules`: modules kept per task, unmerged (MergeVLA: the action head's last layer); none by default.
- The selected task is the layer's state, not the file's: a loaded adapter starts in task-arithmetic mode.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.base import AdapterLayer
from pipelines.adapters.core import (
    AdapterConfig,
    AdapterError,
    _matches,
    add_adapter,
    check_adapter_name,
    check_module_pattern,
    layers_of,
    module_slots,
    register_method,
    set_active,
)
from pipelines.adapters.fields import check_choice, check_int, check_number

ROUTER_SOURCES = ("task-vector", "weight")
ROUTER_SCORES = ("norm", "relative")
MAX_TASKS = 64


@dataclass
class MergeVLAConfig(AdapterConfig):
    method = "mergevla"

    tasks: list[str] = field(default_factory=lambda: ["task-0", "task-1"], metadata={
        "help": "names of the merged tasks, one mask (and router, expert) each"})
    mask_lambda: float = field(default=0.6, metadata={
        "help": "lambda of the TALL mask |tau_t| > lambda |tau_MTL - tau_t| (MergeVLA: 0.6)"})
    merge_scale: float = field(default=1.0, metadata={
        "help": "task-arithmetic scaling s of tau_MTL = s * sum tau_t (MergeVLA: 1.0)"})
    router_k: int = field(default=8, metadata={"help": "k right singular vectors per task and router module "
                                                       "(MergeVLA's k_gate: 8)"})
    router_source: str = field(default="task-vector", metadata={
        "help": "'task-vector': routers from tau_t; 'weight': from theta_0 + tau_t", "choices": list(ROUTER_SOURCES)})
    router_score: str = field(default="norm", metadata={
        "help": "'norm': ||R_t h|| (MergeVLA); 'relative': ||R_t h|| / ||h||, the share of h in task t's subspace",
        "choices": list(ROUTER_SCORES)})
    router_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules whose input the router scores (suffixes or a regex); None: every merged module"})
    expert_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules kept per task instead of merged (MergeVLA: the action head's last layer)"})

    def validate(self) -> None:
        if isinstance(self.tasks, tuple):
            self.tasks = list(self.tasks)
        if not isinstance(self.tasks, list) or not 2 <= len(self.tasks) <= MAX_TASKS:
            raise AdapterError(f"MergeVLA tasks must be a list of 2 to {MAX_TASKS} task names, not {self.tasks!r}")
        for task in self.tasks:
            try:
                check_adapter_name(task)
            except AdapterError:
                raise AdapterError(f"MergeVLA task name {task!r} must be 1-64 letters, digits, '-' or '_'") from None
        if len(set(self.tasks)) != len(self.tasks):
            raise AdapterError("MergeVLA task names must differ from each other")
        check_number("MergeVLA", "mask_lambda", self.mask_lambda, 0.0)
        check_number("MergeVLA", "merge_scale", self.merge_scale, 0.0, low_open=True)
        check_int("MergeVLA", "router_k", self.router_k)
        check_choice("MergeVLA", "router_source", self.router_source, ROUTER_SOURCES)
        check_choice("MergeVLA", "router_score", self.router_score, ROUTER_SCORES)
        for label in ("router_modules", "expert_modules"):
            setattr(self, label, check_module_pattern(f"MergeVLA {label}", getattr(self, label)))

    def inject(self, model: nn.Module, name: str, modules: list[str]) -> list[str]:
        """Each layer learns from its module's name whether it is an expert and whether it routes."""
        slots = {slot.name: slot for slot in module_slots(model)}
        layers = []
        for module in modules:
            expert = _matches(self.expert_modules, module)
            router = self.router_modules is None or _matches(self.router_modules, module)
            layer = MergeVLALinear(slots[module].occupant, self, adapter_name=name, expert=expert, router=router)
            if router and self.router_k > min(layer.in_features, layer.out_features):
                raise AdapterError(f"MergeVLA router_k {self.router_k} is more than {module} has singular vectors "
                                   f"({min(layer.in_features, layer.out_features)}); lower router_k")
            layers.append((slots[module], layer))
        for slot, layer in layers:
            layer.train(slot.occupant.training)
            slot.put(layer)
        return modules


class MergeVLALinear(AdapterLayer):
    """One merged module: `task_vector` tau_MTL (out, in) and `masks` (T, out, in), or on an expert module each
    task's own `task_vectors` (T, out, in); on a router module `router` (T, k, in). `task` is the selected task
    index, or None for plain task arithmetic (tau_MTL unmasked; the sum of the experts)."""

    def __init__(self, base_layer: nn.Module, config: MergeVLAConfig | None = None, adapter_name: str = "default",
                 *, expert: bool = False, router: bool = True) -> None:
        super().__init__(base_layer, adapter_name)
        self.config = config = config or MergeVLAConfig()
        self.expert = expert
        self.routes = router
        count, shape = len(config.tasks), (self.out_features, self.in_features)
        device = self.original_module().weight.device
        if expert:
            self.task_vectors = nn.Parameter(torch.zeros(count, *shape, device=device))
        else:
            self.task_vector = nn.Parameter(torch.zeros(*shape, device=device))
            self.register_buffer("masks", torch.ones(count, *shape, device=device))
        if router:
            self.register_buffer("router", torch.zeros(count, config.router_k, self.in_features, device=device))
        self.task: int | None = None
        self.scoring: str | None = None  # while routing: "norm" or "relative"
        self.last_score: torch.Tensor | None = None

    def weight_for(self, task: int | None) -> torch.Tensor:
        """The update the layer adds for `task` (None: task arithmetic)."""
        if self.expert:
            return self.task_vectors.sum(0) if task is None else self.task_vectors[task]
        return self.task_vector if task is None else self.masks[task] * self.task_vector

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_for(self.task)
        if self.scoring and self.routes and self.task is not None:
            self.last_score = route_score(x, self.router[self.task], relative=self.scoring == "relative")
        return F.linear(x.to(weight.dtype), weight)

    def get_delta_weight(self) -> torch.Tensor:
        return self.weight_for(self.task).detach().float().clone()


MergeVLAConfig.layer_cls = MergeVLALinear


# -- the equations ------------------------------------------------------------------------------------------


def tall_masks(task_vectors: torch.Tensor, merged: torch.Tensor, mask_lambda: float = 0.6) -> torch.Tensor:
    """m_t = 1[|tau_t| > lambda |tau_MTL - tau_t|] for every task: `task_vectors` (T, ...), `merged` tau_MTL."""
    return task_vectors.abs() > mask_lambda * (merged.unsqueeze(0) - task_vectors).abs()


def router_vectors(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of `weight` (out, in) as rows, shape (k, in) (MergeVLA's create_gate)."""
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return vh[:k].contiguous()


def route_score(hidden: torch.Tensor, router: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """||R h||_2 per token (or ||R h||_2 / ||h||_2 with `relative`), averaged over every axis but the first
    (SmileGate, then the mean over tokens)."""
    hidden = hidden.to(router.dtype)
    norms = F.linear(hidden, router).norm(p=2, dim=-1)
    if relative:
        norms = norms / hidden.norm(p=2, dim=-1).clamp_min(torch.finfo(norms.dtype).tiny)
    return norms.reshape(norms.shape[0], -1).mean(1) if norms.dim() > 1 else norms


# -- merging per-task adapters ------------------------------------------------------------------------------


def _merged_layers(model: nn.Module, name: str) -> dict[str, MergeVLALinear]:
    stacks = layers_of(model, name)
    if not stacks:
        raise AdapterError(f"the model has no adapter named {name!r}")
    layers = {module: stack[0] for module, stack in stacks.items()}
    if not all(isinstance(layer, MergeVLALinear) for layer in layers.values()):
        raise AdapterError(f"adapter {name!r} is not a MergeVLA adapter")
    return layers


def task_vectors_of(model: nn.Module, sources: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{source: {module: tau}}: each adapter's update on every module it adapts, folded to a weight delta."""
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for source in sources:
        stacks = layers_of(model, source)
        if not stacks:
            raise AdapterError(f"the model has no adapter named {source!r} to merge")
        try:
            vectors[source] = {module: stack[0].get_delta_weight().detach().float()
                               for module, stack in stacks.items()}
        except NotImplementedError:
            raise AdapterError(f"adapter {source!r} cannot be folded into a weight delta, so it cannot be "
                               "merged") from None
    return vectors


@torch.no_grad()
def merge_task_vectors(model: nn.Module, vectors: dict[str, dict[str, torch.Tensor]],
                       config: MergeVLAConfig | None = None, name: str = "merged") -> list[str]:
    """Add MergeVLA adapter `name` holding the task vectors `vectors` ({task: {module: tau_t}}), the only active
    adapter afterwards; return the modules it adapts.

    tau_t is the change task t made to a module's weight (out, in) relative to the model as it is (theta_0); a
    module a task did not change has tau_t = 0. The adapter holds tau_MTL and the TALL masks (or, on
    `config.expert_modules`, each tau_t) and the routers, as `config` says; `config.tasks` becomes the keys
    of `vectors` and its target modules the modules they name. On any error the model is left as it was.
    """
    tasks = list(vectors)
    if len(tasks) < 2:
        raise AdapterError("merge at least two tasks")
    modules = sorted({module for deltas in vectors.values() for module in deltas})
    if not modules:
        raise AdapterError("the task vectors name no module")
    base = config or MergeVLAConfig()
    config = dataclasses.replace(base, tasks=tasks, target_modules="|".join(re.escape(m) for m in modules),
                                 exclude_modules=None)
    names = add_adapter(model, config, name)
    try:
        layers = _merged_layers(model, name)
        for module in modules:
            _fill(layers[module], [vectors[t].get(module) for t in tasks], config, module)
    except BaseException:
        from pipelines.adapters.core import remove_adapter

        remove_adapter(model, name)
        raise
    set_active(model, [name])
    return names


def _fill(layer: MergeVLALinear, deltas: list[torch.Tensor | None], config: MergeVLAConfig, module: str) -> None:
    shape = (layer.out_features, layer.in_features)
    for delta in deltas:
        if delta is not None and tuple(delta.shape) != shape:
            raise AdapterError(f"a task vector of {module} has shape {tuple(delta.shape)}, expected {shape}")
        if delta is not None and not bool(torch.isfinite(delta).all()):
            raise AdapterError(f"a task vector of {module} holds NaN or infinite values")
    device = layer.original_module().weight.device
    stacked = torch.stack([d.float().cpu() if d is not None else torch.zeros(shape) for d in deltas]).to(device)
    if layer.expert:
        layer.task_vectors.copy_(stacked)
    else:
        merged = config.merge_scale * stacked.sum(0)
        layer.task_vector.copy_(merged)
        layer.masks.copy_(tall_masks(stacked, merged, config.mask_lambda).float())
    if layer.routes:
        base_weight = layer.original_module().weight.detach().float()
        for t in range(len(deltas)):
            weight = stacked[t] if config.router_source == "task-vector" else base_weight + stacked[t]
            layer.router[t].copy_(router_vectors(weight, config.router_k))


def merge_task_adapters(model: nn.Module, sources: list[str], config: MergeVLAConfig | None = None,
                        name: str = "merged") -> list[str]:
    """Fold the per-task adapters `sources` (LoRA or any mergeable method) into one MergeVLA adapter `name`.

    Each source is one task, named after it; its update on each module it adapts is tau_t. The sources stay
    in the model, inactive; remove them with `remove_adapter` if they are not needed.
    """
    sources = list(sources)
    if len(set(sources)) != len(sources):
        raise AdapterError("merge different adapters, each once")
    return merge_task_vectors(model, task_vectors_of(model, sources), config, name)


# -- using the merged adapter ---------------------------------------------------------------------------------


def task_index(config: MergeVLAConfig, task: str | int | None) -> int | None:
    if task is None:
        return None
    if isinstance(task, bool) or not isinstance(task, (int, str)):
        raise AdapterError(f"choose a task by name or index, not {task!r}")
    if isinstance(task, int):
        if not 0 <= task < len(config.tasks):
            raise AdapterError(f"task index {task} is outside 0..{len(config.tasks) - 1}")
        return task
    if task not in config.tasks:
        raise AdapterError(f"the merged adapter has no task {task!r} (it has: {', '.join(config.tasks)})")
    return config.tasks.index(task)


def select_task(model: nn.Module, name: str, task: str | int | None) -> None:
    """Retrieve `task` (its mask and expert) from merged adapter `name`; None gives plain task arithmetic."""
    layers = _merged_layers(model, name)
    index = task_index(next(iter(layers.values())).config, task)
    if any(layer.merged for layer in layers.values()):
        raise AdapterError("unmerge the model before choosing another task")
    for layer in layers.values():
        layer.task = index


def selected_task(model: nn.Module, name: str) -> str | None:
    layer = next(iter(_merged_layers(model, name).values()))
    return None if layer.task is None else layer.config.tasks[layer.task]


def mask_density(model: nn.Module, name: str) -> dict[str, float]:
    """{task: the fraction of its mask's entries that are 1}, over every masked module."""
    layers = [layer for layer in _merged_layers(model, name).values() if not layer.expert]
    if not layers:
        return {}
    tasks = layers[0].config.tasks
    total = sum(layer.masks[0].numel() for layer in layers)
    return {task: float(sum(layer.masks[t].sum() for layer in layers)) / total for t, task in enumerate(tasks)}


@dataclass
class Routing:
    """The router's decision: per example the chosen task, and the softmax over tasks of the scores."""

    tasks: list[str]
    scores: torch.Tensor  # (batch, tasks)
    probabilities: torch.Tensor  # (batch, tasks)

    @property
    def choices(self) -> list[str]:
        return [self.tasks[int(i)] for i in self.probabilities.argmax(-1)]


@torch.no_grad()
def route(model: nn.Module, name: str, run: Callable[[], object], score: str | None = None) -> Routing:
    """Score every task on the input that `run()` feeds the model (the first observation) and pick one each.

    For each candidate task its mask and expert are selected, `run()` is called, and each router module scores
    its input h as mean_tokens ||R_t h||_2; the mean over router modules is the task's score, and the softmax
    over tasks gives the routing weights (MergeVLA's task_router). `score` ("norm" or "relative") overrides
    the config's `router_score`. The previous selection is restored afterwards; select the chosen task with
    `select_task`.
    """
    layers = _merged_layers(model, name)
    routers = [layer for layer in layers.values() if layer.routes]
    if not routers:
        raise AdapterError(f"adapter {name!r} has no router modules")
    config = routers[0].config
    score = config.router_score if score is None else score
    check_choice("MergeVLA", "score", score, ROUTER_SCORES)
    before = next(iter(layers.values())).task
    columns = []
    try:
        for layer in routers:
            layer.scoring = score
        for t in range(len(config.tasks)):
            select_task(model, name, t)
            for layer in routers:
                layer.last_score = None
            run()
            scores = [layer.last_score for layer in routers if layer.last_score is not None]
            if not scores:
                raise AdapterError("the input never reached a router module; route on a full forward pass")
            columns.append(torch.stack(scores).mean(0))
    finally:
        for layer in routers:
            layer.scoring = None
            layer.last_score = None
        for layer in layers.values():
            layer.task = before
    scores = torch.stack(columns, dim=-1).float()
    return Routing(list(config.tasks), scores, scores.softmax(-1))


register_method(
    "mergevla", MergeVLAConfig, title="MergeVLA",
    paper="Fu et al., MergeVLA: Cross-Skill Model Merging Toward a Generalist Vision-Language-Action Agent "
          "(arXiv 2511.18810)",
    property="per-task adapters merged with sparse TALL masks, each task retrieved by a test-time router",
)
