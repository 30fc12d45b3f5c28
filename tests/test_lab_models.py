"""The lab's tiny backbones and data: seeded and cached, fresh copies, the right module names, fixed splits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.errors import ModelNotAvailable
from pipelines.lab import data, models
from pipelines.lab.training import accuracy, evaluate_lm, fit, seeded


def test_a_fresh_build_gives_the_cached_weights_bit_for_bit():
    cached = models.tiny_encoder().state_dict()
    fresh = models.build_backbone("encoder").state_dict()
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[k], fresh[k]) for k in cached)


def test_backbones_are_built_once_and_every_call_returns_an_independent_copy(monkeypatch):
    models.tiny_vit()  # built (or copied from the test cache) once
    marker = models.backbone_folder("vit") / models.MARKER
    stamp = marker.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the backbone was built again")

    monkeypatch.setattr(models, "build_backbone", no_rebuild)
    first, second = models.tiny_vit(), models.tiny_vit()
    assert marker.stat().st_mtime_ns == stamp
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
    assert all(p.requires_grad for p in second.parameters())  # plain modules: nothing frozen


def test_the_pretrained_backbones_learned_their_source_tasks():
    vit = models.tiny_vit()
    with seeded(0):
        probe = models.ImageClassifier(vit, 10)
    fit(probe, probe.head.parameters(), lambda m, b: nn.functional.cross_entropy(m(b.inputs), b.labels),
        data.digits("train"), 60, 1e-2, batch_size=64)
    assert accuracy(probe, data.digits("test")) > 0.5  # a linear probe on the pre-trained features (chance: 0.1)

    lm, tokenizer = models.tiny_causal_lm()
    assert lm.config.vocab_size == tokenizer.vocab_size
    copy_score = evaluate_lm(lm, data.lm_task("copy", "test", n=64))
    untrained = models.BACKBONES["causal_lm"].make()
    assert copy_score["loss"] < evaluate_lm(untrained, data.lm_task("copy", "test", n=64))["loss"]


def test_target_helpers_name_the_projections_of_each_architecture():
    encoder, vit, (lm, _) = models.tiny_encoder(), models.tiny_vit(), models.tiny_causal_lm()
    assert models.attention_targets(encoder) == ["query", "value"]
    assert models.attention_targets(lm, ("q", "k", "v", "o")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert models.attention_targets(vit, "v") == ["v_proj"]
    assert models.attention_targets(encoder, ("o",)) == ["attention.output.dense"]
    assert models.mlp_targets(lm) == ["gate_proj", "up_proj", "down_proj"]
    assert models.mlp_targets(vit) == ["fc1", "fc2"]
    # BERT's feed-forward output is `output.dense`, which would also match the attention's output.dense.
    bert_mlp = models.mlp_targets(encoder)
    assert bert_mlp == ["intermediate.dense", "0.output.dense", "1.output.dense"]
    from pipelines.adapters import LoRAConfig, add_adapter

    wrapped = add_adapter(encoder, LoRAConfig(rank=2, target_modules=bert_mlp))
    assert len(wrapped) == 4 and not any("attention" in name for name in wrapped)
    with pytest.raises(ValueError, match="attention projections are named q, k, v and o"):
        models.attention_targets(encoder, ("x",))


def test_classifiers_accept_other_image_sizes_and_padded_text():
    vit = models.tiny_vit()
    with seeded(0):
        images = models.ImageClassifier(vit, 3)
        text = models.TextClassifier(models.tiny_encoder(), 2)
    assert images(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    task = data.token_classification_task("majority", n=4)
    padded = torch.cat([task.inputs, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([task.attention_mask, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(text(task.inputs, task.attention_mask), text(padded, mask), atol=1e-5)


def test_an_uncached_hub_model_offline_names_the_id_and_the_built_in_choice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable) as error:
        models.load_backbone("encoder", "nobody/no-such-model")
    assert "nobody/no-such-model" in str(error.value) and "tiny-encoder" in str(error.value)
    with pytest.raises(ValueError, match="backbone kind must be one of"):
        models.load_backbone("diffusion")


def test_digit_splits_are_fixed_disjoint_and_shifts_change_the_images():
    train, test = data.digits("train"), data.digits("test")
    assert (len(train), len(test)) == (1348, 449) and train.inputs.shape[1:] == (3, 16, 16)
    assert torch.equal(train.inputs, data.digits("train").inputs)
    flat = {tuple(x.flatten().tolist()) for x in test.inputs[:, 0]}
    assert not any(tuple(x.flatten().tolist()) in flat for x in train.inputs[:200, 0])
    for shift in data.SHIFTS:
        shifted = data.shifted_digits("test", shift)
        assert torch.equal(shifted.labels, test.labels) and not torch.equal(shifted.inputs, test.inputs)
        assert 0.0 <= float(shifted.inputs.min()) and float(shifted.inputs.max()) <= 1.0
    inverted = data.shifted_digits("test", "inversion")
    assert torch.allclose(inverted.inputs, 1 - test.inputs)
    with pytest.raises(ValueError, match="shift must be one of"):
        data.shifted_digits("test", "blur")
    shapes = data.shapes("train", n=40)
    assert sorted(shapes.labels.tolist()) == sorted([i % 4 for i in range(40)])


def _rule(name: str, tokens: list[int]) -> int:
    a, b, c = data.CONTENT_TOKENS[:3]
    if name == "parity":
        return tokens.count(a) % 2
    if name == "majority":
        return int(tokens.count(a) > tokens.count(b))
    if name == "contains-pattern":
        return int(any(tokens[i:i + 3] == [a, b, c] for i in range(len(tokens) - 2)))
    return int(tokens[0] == tokens[-1])


@pytest.mark.parametrize("name", data.TOKEN_TASKS)
def test_token_task_labels_follow_their_rule_and_both_classes_occur(name):
    task = data.token_classification_task(name, "test", n=200, seed=3)
    assert task.inputs[:, 0].eq(data.CLS).all()
    for ids, mask, label in zip(task.inputs, task.attention_mask, task.labels, strict=True):
        tokens = ids[1:][mask[1:].bool()].tolist()
        assert _rule(name, tokens) == int(label)
    assert 0.25 < float(task.labels.float().mean()) < 0.75
    assert torch.equal(task.inputs, data.token_classification_task(name, "test", n=200, seed=3).inputs)


def test_lm_tasks_and_the_character_tokenizer():
    tokenizer = data.CharTokenizer()
    assert tokenizer.decode(tokenizer.encode("sort:cab>abc", eos=True)) == "sort:cab>abc"
    assert tokenizer.encode("A", bos=False) == [tokenizer.unk_id]
    task = data.lm_task("add", "train", n=8, min_len=3, max_len=3)
    for prompt, answer in zip(task.prompts, task.answers, strict=True):
        a, b = prompt[4:-1].split("+")
        assert answer == "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))
    first = task.take(slice(0, 1))
    scored = first.labels[0][first.labels[0] != -100]
    assert tokenizer.decode(scored) == first.answers[0] and scored[-1] == tokenizer.eos_id


class _Oracle(nn.Module):
    """A 'language model' that predicts each next token of the sequences it was built for."""

    def __init__(self, task, vocab: int, wrong_rows: int = 0) -> None:
        super().__init__()
        self.next = torch.roll(task.input_ids, -1, dims=1)
        self.next[:wrong_rows, -2] = (self.next[:wrong_rows, -2] + 1) % vocab
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        class Out:
            logits = nn.functional.one_hot(self.next[: len(input_ids)], self.vocab).float() * 10

        return Out()


def test_evaluate_lm_scores_exact_matches_and_tokens():
    task = data.lm_task("copy", "test", n=4, min_len=4, max_len=4)
    vocab = data.CharTokenizer().vocab_size
    perfect = evaluate_lm(_Oracle(task, vocab), task)
    assert perfect["exact_match"] == 1.0 and perfect["token_accuracy"] == 1.0
    one_wrong = evaluate_lm(_Oracle(task, vocab, wrong_rows=1), task)
    assert one_wrong["exact_match"] == 0.75
    assert one_wrong["token_accuracy"] == pytest.approx(1 - 1 / int((task.labels != -100).sum()))


def test_fit_is_deterministic_and_trains_only_what_it_is_given():
    def run():
        with seeded(5):
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        batches = data.LabData(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)),
                               torch.arange(64) % 2, 2)
        frozen = model[0].weight.detach().clone()
        losses = fit(model, model[2].parameters(), lambda m, b: nn.functional.cross_entropy(m(b.inputs), b.labels),
                     batches, 20, 1e-2, batch_size=16, seed=3)
        assert torch.equal(model[0].weight, frozen)
        return losses, model.state_dict()

    (losses_a, state_a), (losses_b, state_b) = run(), run()
    assert losses_a == losses_b and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
