"""CBQ's calibration: coarse-to-fine outlier preprocessing, then cross-block reconstruction window by window.

    for each window of `window_size` consecutive blocks (sliding by window_size - overlap):
        minimise over S^W and the rounding of the window's layers
            ||h_fp - h_q||^2 + kl_weight KL(softmax(h_fp) || softmax(h_q)) + round_weight sum(1 - |2 h(V) - 1|^beta)
        where h_q is the quantised window's output and h_fp the full-precision window's output
    the blocks no later window contains are then fixed (hard rounding) and their outputs feed the next window

`cbq_calibrate(model, name, blocks, batches)` runs this on any model whose `blocks` (a list of modules, e.g.
`model.model.layers`) run one after the other, each taking the previous one's output as its first argument
(the other arguments, an attention mask or position embeddings, are those the model gave the first block).
The full-precision outputs come from the same model under `disabled()`, so no second copy is held.

Choices of ours (the method section could not be read; see layer.py), each a config setting:
- `target="homologous"`: h_fp is the full-precision window run on the quantised window's own input (our reading
  of the paper's "homologous reconstruction"); "full-precision" runs it on the full-precision model's input
  (BRECQ's and OmniQuant's target).
- The loss is on the window's last output: ||.||^2 summed over features and averaged over tokens (BRECQ's
  `lp_loss`), the KL over each token's softmax across features. The regulariser follows AdaRound/BRECQ: none
  for the first `warmup` share of steps, then beta falling linearly from `beta_start` to `beta_end`.
- One calibration batch a step, in order, cycling. Adam, rounding and step sizes with their own learning rates.
- CFP, coarse: values above Q3 + iqr_factor IQR are outlier candidates (|w| of each layer's weight; the largest
  |x| of each input channel over the calibration tokens). Fine: among the candidates sorted by size, the cut
  between outliers and kept values is the one that maximises (smallest outlier - largest kept value)^2 -
  cfp_lambda var(outliers): the inter-set distance against the intra-set variance (our reading of the
  summaries' M = M_inter - lambda M_intra). Weight outliers are clipped to the largest kept |w|; activation outlier channels
  (only when activations are quantised: with 16-bit activations there is nothing to protect) are divided by
  (max / threshold)^act_migration, the weight's columns multiplied by the same, which changes no output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.cbq.layer import CBQConfig, CBQLinear
from pipelines.adapters.core import AdapterError, adapter_config, disabled, layers_of, method_layers


class _Captured(Exception):
    """Stops the model once the first block has been given its inputs."""


@dataclass
class CBQReport:
    """What calibration did: the windows (first and last block), each window's loss per step, and CFP's cuts."""

    windows: list[tuple[int, int]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    weight_outliers: dict[str, int] = field(default_factory=dict)
    activation_outliers: dict[str, int] = field(default_factory=dict)


def window_starts(blocks: int, window: int, overlap: int) -> list[int]:
    """First block of each window: every window_size - overlap blocks, the last window ending at the last block."""
    if blocks <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, blocks - window + 1, stride))
    if starts[-1] + window < blocks:
        starts.append(blocks - window)
    return starts


def outlier_threshold(values: torch.Tensor, iqr_factor: float = 1.5, lam: float = 1.0) -> tuple[float, int]:
    """CFP on a set of magnitudes: (the largest kept value, how many values are outliers); (inf, 0) if none."""
    values = values.detach().float().reshape(-1)
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype)).tolist()
    coarse = q3 + iqr_factor * (q3 - q1)
    candidates = int((values > coarse).sum())
    if candidates == 0 or candidates == values.numel():
        return float("inf"), 0
    ordered = torch.sort(values, descending=True).values.double()
    count = torch.arange(1, candidates + 1, dtype=torch.float64)
    sums, squares = ordered[:candidates].cumsum(0), (ordered[:candidates] ** 2).cumsum(0)
    out_var = (squares / count - (sums / count) ** 2).clamp_min(0)
    gap = ordered[:candidates] - ordered[1:candidates + 1]  # smallest outlier minus largest kept value
    score = gap**2 - lam * out_var
    outliers = int(torch.argmax(score)) + 1
    return float(ordered[outliers]), outliers


def _cbq_layers(model: nn.Module, name: str) -> dict[int, CBQLinear]:
    return {id(layer): layer for layer in method_layers(model, name, CBQLinear, "CBQ").values()}


def _block_layers(blocks: Sequence[nn.Module], layers: dict[int, CBQLinear]) -> list[list[CBQLinear]]:
    return [[m for m in block.modules() if id(m) in layers] for block in blocks]


def _call(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any] | None) -> Any:
    if run is not None:
        return run(model, batch)
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture_inputs(model, first_block, batches, run) -> list[tuple[tuple, dict]]:
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), _no_cache(kwargs)))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), disabled(model):
            for batch in batches:
                try:
                    _call(model, batch, run)
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise AdapterError("the calibration batches never reached the first block; pass blocks of this model")
    return captured


def _no_cache(kwargs: dict) -> dict:
    """The block's keyword arguments without a key/value cache: a window runs many times on the same inputs."""
    kept = {k: (None if type(v).__name__.endswith("Cache") else v) for k, v in kwargs.items()}
    if "use_cache" in kept:
        kept["use_cache"] = False
    return kept


def _run_blocks(blocks: Sequence[nn.Module], hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    for block in blocks:
        hidden = _first(block(hidden, *args[1:], **kwargs))
    return hidden


def window_loss(prediction: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """||target - prediction||^2 summed over features and averaged over tokens, plus the per-token KL of their
    softmax over features, KL(softmax(target) || softmax(prediction))."""
    prediction, target = prediction.float(), target.float()
    squared = (prediction - target).pow(2).sum(-1).mean()
    if kl_weight == 0:
        return squared
    kl = F.kl_div(F.log_softmax(prediction, -1), F.log_softmax(target, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    return squared + kl_weight * kl


def beta_at(step: int, steps: int, config: CBQConfig) -> float | None:
    """The regulariser's exponent at `step` (None during warm-up): linear from beta_start to beta_end."""
    warm = config.warmup * steps
    if step < warm:
        return None
    progress = (step - warm) / max(steps - warm, 1)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - progress)


@torch.no_grad()
def _preprocess(model, name, layers: list[CBQLinear], batches, run, report: CBQReport) -> None:
    config = layers[0].config
    absmax: dict[int, torch.Tensor] = {}

    def record(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
        absmax[id(module)] = torch.maximum(absmax[id(module)], x) if id(module) in absmax else x

    if config.act_bits < 16:
        handles = [layer.register_forward_pre_hook(record) for layer in layers]
        try:
            with disabled(model):
                for batch in batches:
                    _call(model, batch, run)
        finally:
            for handle in handles:
                handle.remove()
    names = {id(stack[0]): module for module, stack in layers_of(model, name).items()}
    for layer in layers:
        clip, count = outlier_threshold(layer.original_module().weight.abs(), config.iqr_factor, config.cfp_lambda)
        layer.weight_clip.fill_(min(clip, float(layer.original_module().weight.abs().max())))
        report.weight_outliers[names[id(layer)]] = count
        if id(layer) in absmax:
            channel = absmax[id(layer)]
            threshold, channels = outlier_threshold(channel, config.iqr_factor, config.cfp_lambda)
            if channels:
                ratio = (channel / threshold).clamp_min(1.0) ** config.act_migration
                layer.act_scale.copy_(torch.where(channel > threshold, ratio, torch.ones_like(ratio)))
            report.activation_outliers[names[id(layer)]] = channels
        layer.reset_quantizer()


def cbq_calibrate(model: nn.Module, name: str, blocks: Sequence[nn.Module], batches: Sequence[Any], *,
                  run: Callable[[nn.Module, Any], Any] | None = None,
                  callback: Callable[[float, str], None] | None = None) -> CBQReport:
    """Calibrate CBQ adapter `name` on `batches` (each a mapping of model keyword arguments, such as a tokenizer's
    output, a tensor, or whatever `run(model, batch)` takes), block window by block window over `blocks`; return what it did.

    The settings are the adapter's config (window, overlap, steps, learning rates, regulariser, CFP). Layers of
    the adapter outside `blocks` keep round-to-nearest. `callback(fraction, message)` hears of every step.
    """
    config = adapter_config(model, name)
    if not isinstance(config, CBQConfig):
        raise AdapterError(f"adapter {name!r} is not a CBQ adapter")
    blocks = list(blocks)
    batches = list(batches)
    if not blocks or not batches:
        raise AdapterError("CBQ calibration needs at least one block and one calibration batch")
    present = {id(m) for m in model.modules()}
    if not all(isinstance(b, nn.Module) and id(b) in present for b in blocks):
        raise AdapterError("CBQ blocks must be modules of the model being quantised (e.g. model.model.layers)")
    by_block = _block_layers(blocks, _cbq_layers(model, name))
    if not any(by_block):
        raise AdapterError(f"none of the {len(blocks)} blocks holds a layer of CBQ adapter {name!r}")
    report = CBQReport()
    was_training = model.training
    model.eval()
    try:
        if config.cfp:
            _preprocess(model, name, [layer for group in by_block for layer in group], batches, run, report)
        captured = _capture_inputs(model, blocks[0], batches, run)
        quantized = [args[0] for args, _ in captured]
        full = list(quantized)
        starts = window_starts(len(blocks), config.window_size, config.overlap)
        done = 0
        for index, start in enumerate(starts):
            end = min(start + config.window_size, len(blocks))
            window = blocks[start:end]
            layers = [layer for group in by_block[start:end] for layer in group]
            sources = quantized if config.target == "homologous" else full
            with torch.no_grad(), disabled(model):
                targets = [_run_blocks(window, h, args, kwargs) for h, (args, kwargs) in
                           zip(sources, captured, strict=True)]
            report.windows.append((start, end - 1))
            report.losses.append(_reconstruct(window, layers, quantized, targets, captured, config,
                                              callback, index, len(starts)))
            following = starts[index + 1] if index + 1 < len(starts) else len(blocks)
            with torch.no_grad():
                for block_index in range(done, following):
                    for i, (args, kwargs) in enumerate(captured):
                        quantized[i] = _run_blocks([blocks[block_index]], quantized[i], args, kwargs)
                        with disabled(model):
                            full[i] = _run_blocks([blocks[block_index]], full[i], args, kwargs)
            done = following
    finally:
        for group in by_block:
            for layer in group:
                layer.relaxation = None
        model.train(was_training)
    if callback is not None:
        callback(1.0, "calibrated every window")
    return report


def _reconstruct(window, layers: list[CBQLinear], inputs, targets, captured, config: CBQConfig, callback,
                 index: int, windows: int) -> list[float]:
    rounding = [p for layer in layers for n, p in layer.named_parameters(recurse=False) if n.startswith("round_")]
    steps = [layer.step for layer in layers] if config.learn_step else []
    losses: list[float] = []
    if not layers or config.steps == 0 or not (rounding or steps):
        return losses
    groups = [{"params": rounding, "lr": config.learning_rate}] if rounding else []
    if steps:
        groups.append({"params": steps, "lr": config.step_learning_rate})
    optimizer = torch.optim.Adam(groups)
    flags = {id(p): p.requires_grad for p in rounding + steps}
    for p in rounding + steps:
        p.requires_grad_(True)
    for layer in layers:
        layer.relaxation = config.relaxation
    try:
        for step in range(config.steps):
            if callback is not None:
                callback((index + step / config.steps) / windows,
                         f"window {index + 1}/{windows}: step {step + 1}/{config.steps}")
            i = step % len(inputs)
            args, kwargs = captured[i]
            prediction = _run_blocks(window, inputs[i], args, kwargs)
            loss = window_loss(prediction, targets[i], config.kl_weight)
            beta = beta_at(step, config.steps, config)
            if beta is not None and config.round_weight > 0 and config.relaxation == "soft":
                loss = loss + config.round_weight * sum(layer.rounding_regularizer(beta) for layer in layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for layer in layers:
            layer.relaxation = None
        for p in rounding + steps:
            p.requires_grad_(flags[id(p)])
            p.grad = None
    return losses


@torch.no_grad()
def block_output_errors(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence[Any], *,
                        run: Callable[[nn.Module, Any], Any] | None = None) -> list[float]:
    """For each block, ||h_q - h_fp||^2 / ||h_fp||^2 of its output over `batches`: the model as it is (its
    active adapters) against the base model (`disabled()`), each run whole, so errors carry down the blocks."""
    outputs: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def record(module, args, output):
            outputs.setdefault(index, []).append(_first(output).detach().float())
        return record

    def collect() -> list[torch.Tensor]:
        outputs.clear()
        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
        try:
            for batch in batches:
                _call(model, batch, run)
        finally:
            for handle in handles:
                handle.remove()
        return [torch.cat([o.reshape(-1) for o in outputs[i]]) for i in range(len(blocks))]

    was_training = model.training
    model.eval()
    try:
        quantized = collect()
        with disabled(model):
            full = collect()
    finally:
        model.train(was_training)
    return [float((q - f).pow(2).sum() / f.pow(2).sum().clamp_min(1e-30)) for q, f in zip(quantized, full, strict=True)]
