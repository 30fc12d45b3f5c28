"""The lab's small data sets, as tensors, the same on every machine: real handwritten digits and synthetic tasks.

- `digits(split)`: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upsampled to
  16x16 RGB, with a fixed train/test split; `shifted_digits(split, shift)` the same digits in another domain
  (rotated, inverted, noisy or coloured).
- `shapes(split)`: procedural 16x16 images of four shapes in random colours, sizes and places.
- `token_classification_task(name, split)`: sequences over a 32-token vocabulary (parity, majority,
  contains-pattern, first-equals-last) for the tiny encoder.
- `lm_task(name, split)`: prompt/answer character tasks (copy, reverse, sort, add mod 10) for the tiny causal LM,
  tokenized with `CharTokenizer`.

Every generator is seeded from its name, split and seed, so a task is the same tensors bit for bit each time.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

SPLITS = ("train", "test")
IMAGE_SIZE = 16


def _rng(*parts: object) -> random.Random:
    """A Python generator seeded from `parts` (stable across runs and machines, unlike hash())."""
    return random.Random(zlib.crc32("/".join(map(str, parts)).encode()))


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")


@dataclass(frozen=True)
class LabData:
    """A classification data set: `inputs` (images N x 3 x 16 x 16, or token ids N x L), `labels` (N,)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    num_labels: int
    attention_mask: torch.Tensor | None = None
    label_names: tuple[str, ...] = ()
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor | slice) -> LabData:
        """The examples at `index` (a slice or index tensor)."""
        mask = self.attention_mask[index] if self.attention_mask is not None else None
        return replace(self, inputs=self.inputs[index], labels=self.labels[index], attention_mask=mask)

    def head(self, n: int) -> LabData:
        return self.take(slice(0, n))


# -- images -------------------------------------------------------------------------------------------------


def _digit_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images, torch.tensor(bunch.target, dtype=torch.long)


def digits(split: str = "train", test_fraction: float = 0.25) -> LabData:
    """scikit-learn's handwritten digits, upsampled to 16x16 (bilinear) and repeated into RGB, values in [0, 1].

    The split is a fixed permutation (the same every time): `test_fraction` of the images are the test set.
    """
    _check_split(split)
    images, labels = _digit_arrays()
    order = torch.randperm(len(labels), generator=_generator("digits-split"))
    n_test = int(round(len(labels) * test_fraction))
    index = order[n_test:] if split == "train" else order[:n_test]
    big = F.interpolate(images[index].unsqueeze(1), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                        align_corners=False).clamp(0, 1)
    return LabData(big.repeat(1, 3, 1, 1).contiguous(), labels[index], 10,
                   label_names=tuple(str(d) for d in range(10)), name="digits")


SHIFTS = ("rotation", "inversion", "noise", "colour")
SHIFT_DEFAULTS = {"rotation": 45.0, "inversion": 1.0, "noise": 0.3, "colour": 1.0}


def _rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    angle = math.radians(degrees)
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]])
    grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def shifted_digits(split: str = "train", shift: str = "rotation", strength: float | None = None,
                   seed: int = 0) -> LabData:
    """The digits in another domain, a stand-in for the shift between pre-training and deployment data.

    `rotation`: every image turned by `strength` degrees (default 45). `inversion`: light strokes on dark
    becomes dark on light, mixed by `strength` (1: fully inverted). `noise`: Gaussian pixel noise of standard
    deviation `strength` (default 0.3), clipped to [0, 1]. `colour`: strokes and background each get a random
    colour per image, `strength` mixing towards it (1: fully coloured).
    """
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, not {shift!r}")
    strength = SHIFT_DEFAULTS[shift] if strength is None else float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, not {strength}")
    data = digits(split)
    images = data.inputs
    if shift == "rotation":
        images = _rotate(images, strength)
    elif shift == "inversion":
        images = images + strength * (1 - 2 * images)
    elif shift == "noise":
        noise = torch.randn(images[:, :1].shape, generator=_generator("noise", split, seed))
        images = images + strength * noise.expand_as(images)
    else:
        g = _generator("colour", split, seed)
        fg = torch.rand(len(images), 3, 1, 1, generator=g)
        bg = torch.rand(len(images), 3, 1, 1, generator=g)
        coloured = bg * (1 - images) + fg * images
        images = images + strength * (coloured - images)
    return replace(data, inputs=images.clamp(0, 1).contiguous(), name=f"digits-{shift}")


SHAPES = ("circle", "square", "triangle", "cross")


def _shape_mask(kind: str, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE) + 0.5, torch.arange(IMAGE_SIZE) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    if kind == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    return ((dx.abs() <= r * 0.3) & (dy.abs() <= r)) | ((dy.abs() <= r * 0.3) & (dx.abs() <= r))


def shapes(split: str = "train", n: int = 800, seed: int = 0) -> LabData:
    """`n` procedural 16x16 RGB images of a circle, square, triangle or cross (the label), each in a random
    colour on a random background, of random size and place."""
    _check_split(split)
    rng = _rng("shapes", split, seed)
    images, labels = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE), torch.empty(n, dtype=torch.long)
    for i in range(n):
        label = i % len(SHAPES)
        r = rng.uniform(3.5, 6.5)
        cx, cy = rng.uniform(r, IMAGE_SIZE - r), rng.uniform(r, IMAGE_SIZE - r)
        fg = torch.tensor([rng.random() for _ in range(3)])
        bg = torch.tensor([rng.random() for _ in range(3)])
        if (fg - bg).abs().sum() < 0.6:  # keep the shape visible
            bg = 1 - fg
        mask = _shape_mask(SHAPES[label], cx, cy, r).float()
        images[i] = bg.view(3, 1, 1) * (1 - mask) + fg.view(3, 1, 1) * mask
        labels[i] = label
    order = torch.randperm(n, generator=_generator("shapes-order", split, seed))
    return LabData(images[order], labels[order], len(SHAPES), label_names=SHAPES, name="shapes")


# -- token tasks for the encoder -------------------------------------------------------------------------------

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_TOKEN = 4
TOKEN_VOCAB_SIZE = 32  # 4 special tokens and 28 content tokens
CONTENT_TOKENS = tuple(range(FIRST_TOKEN, TOKEN_VOCAB_SIZE))
TOKEN_TASKS = ("parity", "majority", "contains-pattern", "first-equals-last")
_A, _B, _C = CONTENT_TOKENS[:3]


def _token_example(name: str, rng: random.Random, length: int) -> tuple[list[int], int]:
    others = CONTENT_TOKENS[3:]
    if name == "parity":
        tokens = [rng.choice(CONTENT_TOKENS[:4]) for _ in range(length)]
        return tokens, tokens.count(_A) % 2
    if name == "majority":
        n_a, n_b = rng.sample(range(1, length // 2 + 1), 2)
        tokens = [_A] * n_a + [_B] * n_b + [rng.choice(others) for _ in range(length - n_a - n_b)]
        rng.shuffle(tokens)
        return tokens, int(n_a > n_b)
    if name == "contains-pattern":
        # Both classes hold A, B and C; only the positives have them next to each other in that order, so
        # counting tokens is not enough: the order matters.
        label = rng.random() < 0.5
        while True:
            tokens = [rng.choice(others) for _ in range(length)]
            spots = rng.sample(range(length - 2), 1) if label else []
            if label:
                tokens[spots[0]:spots[0] + 3] = [_A, _B, _C]
            else:
                for token, at in zip((_A, _B, _C), rng.sample(range(length), 3), strict=True):
                    tokens[at] = token
            found = any(tokens[i:i + 3] == [_A, _B, _C] for i in range(length - 2))
            if found == label:
                return tokens, int(label)
    if name == "first-equals-last":
        tokens = [rng.choice(CONTENT_TOKENS[:8]) for _ in range(length)]
        if rng.random() < 0.5:
            tokens[-1] = tokens[0]
        return tokens, int(tokens[0] == tokens[-1])
    raise ValueError(f"token task must be one of {', '.join(TOKEN_TASKS)}, not {name!r}")


def token_classification_task(name: str, split: str = "train", n: int = 512, length: int = 12,
                              min_length: int | None = None, seed: int = 0) -> LabData:
    """`n` sequences `[CLS] t1 .. tL [PAD]...` with binary labels; lengths vary from `min_length` (default
    `length` - 4) to `length`, padded with PAD (the attention mask says which tokens are real).

    parity: whether token A occurs an odd number of times (among 4 tokens). majority: whether A occurs more
    often than B. contains-pattern: whether A B C appear next to each other in that order. first-equals-last:
    whether the first and last tokens are the same.
    """
    _check_split(split)
    if name not in TOKEN_TASKS:
        raise ValueError(f"token task must be one of {', '.join(TOKEN_TASKS)}, not {name!r}")
    min_length = max(4, length - 4) if min_length is None else min_length
    if not 4 <= min_length <= length <= 62:
        raise ValueError(f"sequence lengths must satisfy 4 <= min_length <= length <= 62, not {min_length}..{length}")
    rng = _rng("tokens", name, split, seed)
    ids = torch.full((n, length + 1), PAD, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        tokens, label = _token_example(name, rng, rng.randint(min_length, length))
        ids[i, 0] = CLS
        ids[i, 1:len(tokens) + 1] = torch.tensor(tokens)
        labels[i] = label
    return LabData(ids, labels, 2, attention_mask=(ids != PAD).long(), label_names=("no", "yes"), name=name)


def mlm_corpus(n: int = 2048, length: int = 24, seed: int = 0) -> torch.Tensor:
    """Pre-training text for the encoder: `[CLS]` and sequences of a fixed random Markov chain over the content
    tokens (each token has three likely successors), so that masked tokens can be told from their context."""
    rng = _rng("mlm-chain", seed)
    successors = {t: rng.sample(CONTENT_TOKENS, 3) for t in CONTENT_TOKENS}
    ids = torch.empty(n, length + 1, dtype=torch.long)
    ids[:, 0] = CLS
    for i in range(n):
        token = rng.choice(CONTENT_TOKENS)
        for j in range(length):
            ids[i, j + 1] = token
            token = rng.choice(successors[token]) if rng.random() < 0.85 else rng.choice(CONTENT_TOKENS)
    return ids


# -- character tasks for the causal LM ----------------------------------------------------------------------


class CharTokenizer:
    """One token per character over a fixed alphabet (digits, lower-case letters, space and `:>+=,.`), after
    four special tokens: `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3 (any other character)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz :>+=,."
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self) -> None:
        self._ids = {c: i + len(self.SPECIALS) for i, c in enumerate(self.ALPHABET)}
        self._chars = {i: c for c, i in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.ALPHABET)

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self._ids.get(c, self.unk_id) for c in text]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, *, skip_special: bool = True) -> str:
        out = []
        for i in (ids.tolist() if hasattr(ids, "tolist") else ids):
            if i in self._chars:
                out.append(self._chars[i])
            elif not skip_special:
                out.append(self.SPECIALS[i] if 0 <= i < len(self.SPECIALS) else self.SPECIALS[self.unk_id])
        return "".join(out)

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and the attention mask."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, (ids != self.pad_id).long()


LM_TASKS = ("copy", "reverse", "sort", "add")
_LETTERS = "abcdefghij"
_WORDS = {
    "subject": ("the cat", "a dog", "the bird", "my friend", "the robot", "a child"),
    "verb": ("sees", "likes", "finds", "draws", "follows", "counts"),
    "object": ("the ball", "a tree", "the moon", "two stars", "the river", "a red box"),
}


def _lm_pair(name: str, rng: random.Random, min_len: int, max_len: int) -> tuple[str, str]:
    size = rng.randint(min_len, max_len)
    if name == "add":
        a = "".join(rng.choice("0123456789") for _ in range(size))
        b = "".join(rng.choice("0123456789") for _ in range(size))
        return f"add:{a}+{b}>", "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))
    word = "".join(rng.choice(_LETTERS) for _ in range(size))
    answer = {"copy": word, "reverse": word[::-1], "sort": "".join(sorted(word))}.get(name)
    if answer is None:
        raise ValueError(f"LM task must be one of {', '.join(LM_TASKS)}, not {name!r}")
    return f"{name}:{word}>", answer


@dataclass(frozen=True)
class LMTask:
    """Prompt/answer pairs and their tensors: `input_ids` = `<bos>` prompt answer `<eos>` (right-padded),
    `labels` the same ids with -100 on the prompt and padding (the loss and the scores cover the answer)."""

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, index: torch.Tensor | slice) -> LMTask:
        keep = range(len(self))[index] if isinstance(index, slice) else index.tolist()
        return replace(self, prompts=tuple(self.prompts[i] for i in keep),
                       answers=tuple(self.answers[i] for i in keep), input_ids=self.input_ids[index],
                       attention_mask=self.attention_mask[index], labels=self.labels[index])


def lm_examples(pairs: list[tuple[str, str]], name: str, tokenizer: CharTokenizer | None = None) -> LMTask:
    """Tensors for prompt/answer pairs (see LMTask)."""
    tokenizer = tokenizer or CharTokenizer()
    sequences, answer_starts = [], []
    for prompt, answer in pairs:
        head = tokenizer.encode(prompt, bos=True)
        sequences.append(head + tokenizer.encode(answer, bos=False, eos=True))
        answer_starts.append(len(head))
    ids, mask = tokenizer.pad(sequences)
    labels = ids.clone()
    for i, start in enumerate(answer_starts):
        labels[i, :start] = -100
    labels[mask == 0] = -100
    return LMTask(name, tuple(p for p, _ in pairs), tuple(a for _, a in pairs), ids, mask, labels)


def lm_task(name: str, split: str = "train", n: int = 256, min_len: int = 3, max_len: int = 6,
            seed: int = 0) -> LMTask:
    """`n` examples of a character task: `copy:abc>abc`, `reverse:abc>cba`, `sort:cab>abc`, and
    `add:351+472>723` (digit-wise sum mod 10); words of `min_len` to `max_len` letters (a-j) or digits."""
    _check_split(split)
    if name not in LM_TASKS:
        raise ValueError(f"LM task must be one of {', '.join(LM_TASKS)}, not {name!r}")
    if not 1 <= min_len <= max_len <= 12:
        raise ValueError(f"word lengths must satisfy 1 <= min_len <= max_len <= 12, not {min_len}..{max_len}")
    rng = _rng("lm", name, split, seed)
    return lm_examples([_lm_pair(name, rng, min_len, max_len) for _ in range(n)], name)


def plain_text(n: int = 256, seed: int = 0) -> list[str]:
    """Templated sentences ("the cat sees a tree.") for the language model's pre-training corpus."""
    rng = _rng("text", seed)
    return [f"{rng.choice(_WORDS['subject'])} {rng.choice(_WORDS['verb'])} {rng.choice(_WORDS['object'])}."
            for _ in range(n)]
