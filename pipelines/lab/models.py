"""The lab's tiny backbones: transformers models built from configs and briefly pre-trained on the lab's data.

- `tiny_encoder()`: a BERT encoder (hidden 64, 2 layers) pre-trained with masked-LM on a Markov-chain token
  corpus; `TextClassifier(encoder, num_labels)` puts a head on it.
- `tiny_causal_lm()`: a Llama causal LM (hidden 64, SwiGLU MLP with gate/up/down_proj, 2 layers) pre-trained on
  the character tasks (copy, reverse, sort, add mod 10) and templated sentences; returned with its
  `CharTokenizer`.
- `tiny_vit()`: a ViT (16x16 RGB images, patch 4, hidden 64, 4 layers) pre-trained to classify the upright
  handwritten digits (the source domain); `ImageClassifier(vit, num_labels)` puts a head on it.

Each is built once with fixed seeds (a few seconds on one CPU thread), written as safetensors with its config to
`$BLOCKSTUDIO_HOME/lab/models/<name>-v<version>/` (atomically: a folder appears complete or not at all), and every
call returns a fresh copy loaded from there. The same seed gives the same weights bit for bit on a machine (a
different number of CPU threads may round differently). `load_backbone(kind, model_id)` loads a Hub model
instead. `attention_targets` and `mlp_targets` name the projections to adapt in any of these architectures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.errors import ModelNotAvailable
from pipelines.lab import data
from pipelines.lab.data import CharTokenizer
from pipelines.lab.training import classification_loss, fit, seeded
from pipelines.storage import home_dir

BACKBONE_KINDS = ("encoder", "causal_lm", "vit")
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MARKER = "blockstudio.json"
_BUILD_LOCK = threading.Lock()


# -- heads --------------------------------------------------------------------------------------------------


class TextClassifier(nn.Module):
    """An encoder and a linear head over its pooled output: the mean of the real tokens' last hidden states
    (`pooling="mean"`, the default: robust on a tiny encoder) or the first token's (`"cls"`)."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))


class ImageClassifier(nn.Module):
    """A ViT and a linear head over its first ([CLS]) token (`pooling="cls"`) or its mean patch token (`"mean"`).

    Images whose size or channel count differ from the ViT's config are resized (bilinear) and converted
    (grey <-> RGB) first, so the lab's 16x16 images also go through a Hub ViT.
    """

    def __init__(self, vit: nn.Module, num_labels: int, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.vit = vit
        self.pooling = pooling
        self.head = nn.Linear(vit.config.hidden_size, num_labels)

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        config = self.vit.config
        channels = getattr(config, "num_channels", pixel_values.shape[1])
        if pixel_values.shape[1] != channels:
            pixel_values = (pixel_values.mean(1, keepdim=True) if channels == 1
                            else pixel_values[:, :1].expand(-1, channels, -1, -1))
        size = getattr(config, "image_size", pixel_values.shape[-1])
        if tuple(pixel_values.shape[-2:]) != (size, size):
            pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state
        return self.head(hidden[:, 0] if self.pooling == "cls" else hidden[:, 1:].mean(1))


# -- the backbones and how each is pre-trained -----------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """A tiny backbone: its cache name and version, how to make its (untrained) model, and how to pre-train it."""

    name: str
    version: int
    make: Callable[[], nn.Module]
    pretrain: Callable[[nn.Module, int], float]  # returns the final pre-training loss
    seed: int = 0

    @property
    def folder(self) -> Path:
        return home_dir() / "lab" / "models" / f"{self.name}-v{self.version}"


def _eager(config):
    # Plain attention: on sequences of 17-50 tokens it is several times faster on a CPU than the fused kernels
    # (whose backward pass dominates a step at this size), and it computes the same thing.
    config._attn_implementation = "eager"
    return config


def _encoder_config():
    from transformers import BertConfig

    return _eager(BertConfig(
        vocab_size=data.TOKEN_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, type_vocab_size=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=data.PAD))


def _make_encoder() -> nn.Module:
    from transformers import BertModel

    return BertModel(_encoder_config(), add_pooling_layer=False)


def _pretrain_encoder(encoder: nn.Module, seed: int, steps: int = 200) -> float:
    """Masked-LM on the Markov-chain corpus: 20% of the content tokens become [MASK], and a temporary linear
    layer over the vocabulary (thrown away afterwards) predicts them from the encoder's output."""
    corpus = data.mlm_corpus(n=1024, length=16, seed=seed)
    head = nn.Linear(encoder.config.hidden_size, data.TOKEN_VOCAB_SIZE)
    model = nn.ModuleDict({"encoder": encoder, "head": head})

    def masked(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = corpus[torch.randint(len(corpus), (64,), generator=generator)]
        chosen = (torch.rand(ids.shape, generator=generator) < 0.2) & (ids >= data.FIRST_TOKEN)
        return ids.masked_fill(chosen, data.MASK), torch.where(chosen, ids, torch.full_like(ids, -100))

    def loss(_, batch) -> torch.Tensor:
        ids, labels = batch
        hidden = encoder(input_ids=ids).last_hidden_state
        return F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)

    return fit(model, model.parameters(), loss, masked, steps, 5e-3, seed=seed)[-1]


def _causal_lm_config():
    from transformers import LlamaConfig

    tokenizer = CharTokenizer()
    return _eager(LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, tie_word_embeddings=False))


def _make_causal_lm() -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(_causal_lm_config())


def _pretrain_causal_lm(model: nn.Module, seed: int, steps: int = 200) -> float:
    """Next-token prediction over whole sequences of the four character tasks and the templated sentences."""
    tokenizer = CharTokenizer()
    pairs = []
    for name in data.LM_TASKS:
        task = data.lm_task(name, "train", n=384, min_len=2, max_len=6, seed=seed)
        pairs += list(zip(task.prompts, task.answers, strict=True))
    pairs += [(sentence, "") for sentence in data.plain_text(384, seed=seed)]
    corpus = data.lm_examples(pairs, "pretraining", tokenizer)
    # Pre-training learns every token, prompt included.
    corpus = data.LMTask(corpus.name, corpus.prompts, corpus.answers, corpus.input_ids, corpus.attention_mask,
                         corpus.input_ids.masked_fill(corpus.attention_mask == 0, -100))

    def loss(m, batch) -> torch.Tensor:
        return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    return fit(model, model.parameters(), loss, corpus, steps, 3e-3, batch_size=32, seed=seed)[-1]


def _vit_config():
    from transformers import ViTConfig

    return _eager(ViTConfig(
        image_size=data.IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _make_vit() -> nn.Module:
    from transformers import ViTModel

    return ViTModel(_vit_config(), add_pooling_layer=False)


def _pretrain_vit(vit: nn.Module, seed: int, steps: int = 120) -> float:
    """Classify the upright digits (the source domain) with a temporary head, thrown away afterwards."""
    classifier = ImageClassifier(vit, 10)
    return fit(classifier, classifier.parameters(), classification_loss, data.digits("train"), steps, 3e-3,
               batch_size=64, seed=seed)[-1]


BACKBONES: dict[str, Backbone] = {
    "encoder": Backbone("tiny-encoder", 1, _make_encoder, _pretrain_encoder),
    "causal_lm": Backbone("tiny-causal-lm", 1, _make_causal_lm, _pretrain_causal_lm),
    "vit": Backbone("tiny-vit", 1, _make_vit, _pretrain_vit),
}


def _backbone(kind: str) -> Backbone:
    if kind not in BACKBONES:
        raise ValueError(f"backbone kind must be one of {', '.join(BACKBONE_KINDS)}, not {kind!r}")
    return BACKBONES[kind]


def build_backbone(kind: str, seed: int | None = None) -> nn.Module:
    """Make and pre-train a backbone now (no cache): the same seed gives the same weights bit for bit."""
    spec = _backbone(kind)
    seed = spec.seed if seed is None else seed
    with seeded(seed):
        model = spec.make()
        model.blockstudio_pretraining_loss = spec.pretrain(model, seed)
    model.eval()
    return model


def backbone_folder(kind: str) -> Path:
    """The cached folder of a backbone, building it first if it is not there (once, atomically)."""
    spec = _backbone(kind)
    folder = spec.folder
    if (folder / MARKER).is_file():
        return folder
    with _BUILD_LOCK:
        if (folder / MARKER).is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            started = time.perf_counter()
            model = build_backbone(kind)
            state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(state, staging / WEIGHTS)
            (staging / CONFIG).write_text(model.config.to_json_string())
            (staging / MARKER).write_text(json.dumps({
                "name": spec.name, "version": spec.version, "seed": spec.seed,
                "pretraining_loss": round(float(model.blockstudio_pretraining_loss), 6),
                "build_seconds": round(time.perf_counter() - started, 2)}, indent=2) + "\n")
            try:
                os.replace(staging, folder)
            except OSError:
                # Another process finished first; its folder holds the same seeded build.
                if not (folder / MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _load_cached(kind: str) -> nn.Module:
    spec = _backbone(kind)
    folder = backbone_folder(kind)
    model = spec.make()
    model.load_state_dict(load_file(folder / WEIGHTS), strict=True)
    model.eval()
    return model


def tiny_encoder() -> nn.Module:
    """A fresh copy of the pre-trained tiny BERT encoder (a transformers `BertModel`, no pooling layer)."""
    return _load_cached("encoder")


def tiny_causal_lm() -> tuple[nn.Module, CharTokenizer]:
    """A fresh copy of the pre-trained tiny Llama (`LlamaForCausalLM`) and the `CharTokenizer` it reads."""
    return _load_cached("causal_lm"), CharTokenizer()


def tiny_vit() -> nn.Module:
    """A fresh copy of the tiny ViT (a transformers `ViTModel`, no pooling layer) pre-trained on the digits."""
    return _load_cached("vit")


_TINY = {"encoder": tiny_encoder, "causal_lm": tiny_causal_lm, "vit": tiny_vit}
_BUILT_IN = {"encoder": "tiny-encoder", "causal_lm": "tiny-causal-lm", "vit": "tiny-vit"}


def load_backbone(kind: str, model_id: str = ""):
    """The backbone of `kind` ("encoder", "causal_lm", "vit"): the built-in tiny one when `model_id` is empty,
    else the Hub model `model_id` (safetensors weights only) when it is in the local cache or the Hub can be
    reached. Returns what the tiny builder returns: a model, or for "causal_lm" a (model, tokenizer) pair."""
    _backbone(kind)
    if not model_id:
        return _TINY[kind]()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    loader = AutoModelForCausalLM if kind == "causal_lm" else AutoModel

    def load(local_only: bool):
        model = loader.from_pretrained(model_id, local_files_only=local_only, use_safetensors=True)
        model.eval()
        if kind == "causal_lm":
            return model, AutoTokenizer.from_pretrained(model_id, local_files_only=local_only)
        return model

    try:
        return load(offline)
    except Exception as first:  # network and cache misses raise several error types; all mean "not here"
        try:
            return load(True)
        except Exception:
            raise ModelNotAvailable(
                f"model {model_id} is not in the local Hugging Face cache and the Hub cannot be reached "
                f"({type(first).__name__}); download it once with network access, or leave the model id empty "
                f"to use the built-in {_BUILT_IN[kind]}") from None


# -- which modules to adapt -----------------------------------------------------------------------------------

_ATTENTION = {
    "q": r"query|q_proj|q_lin|to_q",
    "k": r"key|k_proj|k_lin|to_k",
    "v": r"value|v_proj|v_lin|to_v",
    "o": r"attention\.output\.dense|o_proj|out_proj|out_lin|to_out\.0",
}
_MLP = r"gate_proj|up_proj|down_proj|fc1|fc2|intermediate\.dense|c_fc|mlp\.c_proj|lin1|lin2"
_BERT_MLP_OUT = r"(?<!attention\.)output\.dense"


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if name and hasattr(module, "in_features") and hasattr(module, "out_features")]


def _shortest_suffixes(all_names: list[str], wanted: list[str]) -> list[str]:
    """For each wanted module the shortest dotted tail that names only wanted modules; each tail once."""
    wanted_set = set(wanted)
    out: dict[str, None] = {}
    for name in wanted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            tail = ".".join(parts[-k:])
            hits = {n for n in all_names if n == tail or n.endswith("." + tail)}
            if hits <= wanted_set:
                out.setdefault(tail, None)
                break
    return list(out)


def _targets(model: nn.Module, pattern: str, what: str) -> list[str]:
    names = _linear_names(model)
    wanted = [n for n in names if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", n)]
    if not wanted:
        raise ValueError(f"found no {what} in {type(model).__name__}; name the target modules yourself")
    return _shortest_suffixes(names, wanted)


def attention_targets(model: nn.Module, which: tuple[str, ...] | str = ("q", "v")) -> list[str]:
    """Module suffixes of the attention projections `which` ("q", "k", "v", "o") of a BERT, ViT or Llama model
    (`query`/`value` in BERT, `q_proj`/`v_proj` in Llama and transformers' ViT), for `target_modules`."""
    which = (which,) if isinstance(which, str) else tuple(which)
    unknown = [w for w in which if w not in _ATTENTION]
    if unknown or not which:
        raise ValueError(f"attention projections are named q, k, v and o, not {unknown or which}")
    return _targets(model, "|".join(_ATTENTION[w] for w in which), f"attention projections {'/'.join(which)}")


def mlp_targets(model: nn.Module) -> list[str]:
    """Module suffixes of the feed-forward layers (gate/up/down_proj in Llama, fc1/fc2 in ViT,
    intermediate.dense and the block's output.dense in BERT)."""
    return _targets(model, f"{_MLP}|{_BERT_MLP_OUT}", "feed-forward layers")
