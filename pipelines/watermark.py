"""An owner's signature in an adapter package, after Hot-Swap MarkBoard: bits held by LoRA branches, changed by
swapping branches, read back by black-box queries of the package's layers, and mixed into the style's factors.

A diffusion LoRA has no class labels to answer trigger inputs with, and teaching a trained style to answer
triggers would mean training it again, which MarkBoard exists to avoid. So the branches live in weight space
and the queries go to the package's own layers (`pipelines.adapters.markboard` is the method on models that
answer queries with labels):

    probes     for every branch slot k of a module (4 per module), an input t_k (unit, the module's four
               orthonormal) and an output direction v_k (unit), drawn from the owner's key and the module name
    branches   bit i has two branches on each of its slots: +eps v_k t_k^T (bit 1) and -eps v_k t_k^T (bit 0),
               each a rank-one LoRA branch (a row of A, a column of B) appended to the module's factors; every
               module gets as many new rows as the busiest one (zeros where it carries less), so all modules
               keep one rank, as kohya files and their loaders expect
    swap       a new signature picks the other branch where a bit changes: nothing is trained
    read       query the module with t_k, look along v_k: q = v_k^T (B A t_k); z = q / (|B A|_F / sqrt(d_in d_out));
               bit i = the sign of the mean z over its slots, read when |mean z| >= 4
    mixing     the factors are rotated by an orthogonal matrix from the key (A <- Q A, B <- B Q^T): the product
               is the same, and the branches are no longer separate rows one could drop

eps is chosen so that a branch reads `strength` (default 10) times the spread that the style's own delta gives
a random probe, so a package without a signature (or read with another key) reads near 0 and a marked one near
+-strength. The branches add a rank-one term of that size per slot, in directions no prompt favours; at SDXL's
widths this is a few percent of the style's delta. Slots are laid out slot-major over the modules (sorted by
name) that are wide enough (d_in * d_out >= 2048), and bit i takes every slot whose index is i modulo the
capacity, min(64, 4 x modules): more modules, more slots per bit.

What a package records (adapter.json `watermark` and each weight file's `blockstudio.watermark` metadata): the
scheme, the number of bits and the strength; never the signature or the key. A package trained with DyLoRA or
SoRA is signed as a copy at its current rank, without the trained factors it could be exported from at others
(an export from them would carry no signature). Without a key (the default, an
empty key) anyone can read and change the signature; with one, only its holder. Known limits: a re-factoring of
the LoRA (an SVD) keeps the signature readable but makes a later swap refuse; truncating it to its original rank
removes the signature along with the directions it holds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines import formats
from pipelines.errors import BlockStudioError
from pipelines.package import AdapterPackage, PackageInfo, check_name, rewrite_weights

SCHEME = "markboard-lora-probes-v1"
CAPACITY = 64
SLOTS = 4
DEFAULT_STRENGTH = 10.0
MIN_STRENGTH, MAX_STRENGTH = 6.0, 16.0
DETECT = 4.0  # a bit is read when the mean of its slots' z reaches this
MIN_AREA = int(2 * MAX_STRENGTH**2 * SLOTS)  # d_in * d_out a module needs to carry slots
METADATA_KEY = "blockstudio.watermark"
MAX_KEY_LENGTH = 256


class WatermarkError(BlockStudioError):
    """A signature, key or package that cannot be marked or read; the message says why."""


# -- inputs -------------------------------------------------------------------------------------------------


def parse_bits(signature: str) -> list[int]:
    """"1011 0010" -> [1, 0, 1, 1, 0, 0, 1, 0]; only 0 and 1 (spaces and '_' are ignored)."""
    text = str(signature).replace(" ", "").replace("_", "")
    if not text or any(c not in "01" for c in text):
        raise WatermarkError(f"a signature is a string of 0 and 1, e.g. 10110010, not {str(signature)[:40]!r}")
    return [int(c) for c in text]


def check_key(key: str | None) -> str:
    key = key or ""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or any(ord(c) < 32 for c in key):
        raise WatermarkError(f"the key must be one line of at most {MAX_KEY_LENGTH} characters")
    return key


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not MIN_STRENGTH <= strength <= MAX_STRENGTH:
        raise WatermarkError(f"strength must be a number from {MIN_STRENGTH:g} to {MAX_STRENGTH:g}, not {strength!r}")
    return float(strength)


# -- what the key decides -----------------------------------------------------------------------------------


def _generator(key: str, *parts: object) -> torch.Generator:
    digest = hashlib.sha256("\x1f".join([SCHEME, key, *map(str, parts)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))


def probes(key: str, module: str, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T (SLOTS, d_in) with orthonormal rows, V (SLOTS, d_out) unit rows) of one module, in float64."""
    generator = _generator(key, "probes", module)
    t = torch.randn(in_features, SLOTS, generator=generator, dtype=torch.float64)
    t = torch.linalg.qr(t)[0].T.contiguous()
    v = torch.randn(SLOTS, out_features, generator=generator, dtype=torch.float64)
    return t, v / v.norm(dim=1, keepdim=True)


def mixer(key: str, module: str, rank: int) -> torch.Tensor:
    """An orthogonal (rank, rank) matrix from the key: the rotation that hides the branches among the factors."""
    generator = _generator(key, "mix", module, rank)
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class Slot:
    module: str
    index: int  # 0..SLOTS-1 within the module
    bit: int


def layout(shapes: dict[str, tuple[int, int]]) -> tuple[list[Slot], int]:
    """Every branch slot with the bit it carries, and the capacity in bits. `shapes`: module -> (d_out, d_in)."""
    modules = sorted(m for m, (out_f, in_f) in shapes.items() if out_f * in_f >= MIN_AREA and min(out_f, in_f) > SLOTS)
    capacity = min(CAPACITY, SLOTS * len(modules))
    slots = [Slot(module, j, (j * len(modules) + m) % capacity) for j in range(SLOTS)
             for m, module in enumerate(modules)] if capacity else []
    return slots, capacity


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {m: (int(b.shape[0]), int(a.shape[1])) for m, (a, b) in formats.lora_modules(state).items()}


def capacity_of(state: dict[str, torch.Tensor]) -> int:
    return layout(_shapes(state))[1]


# -- marking, unmarking, reading ----------------------------------------------------------------------------


def _check_fits(bits: list[int], capacity: int) -> None:
    if capacity == 0:
        raise WatermarkError("this adapter has no layer wide enough to hold a signature")
    if len(bits) > capacity:
        raise WatermarkError(f"the signature has {len(bits)} bits but this package's branches hold at most "
                             f"{capacity}; use a shorter signature")


def _carriers(state: dict[str, torch.Tensor], bits_count: int) -> tuple[dict[str, list[Slot]], int]:
    """{module: the slots carrying the first `bits_count` bits}, and how many rows each module gets: the most any
    module carries, so that every module keeps one rank (kohya files and their loaders expect one)."""
    slots, capacity = layout(_shapes(state))
    _check_fits(list(range(bits_count)), capacity)
    used: dict[str, list[Slot]] = {}
    for slot in slots:
        if slot.bit < bits_count:
            used.setdefault(slot.module, []).append(slot)
    return used, max(len(c) for c in used.values())


def mark_state(state: dict[str, torch.Tensor], bits: list[int], key: str = "",
               strength: float = DEFAULT_STRENGTH) -> dict[str, torch.Tensor]:
    """The canonical LoRA state with `bits` added as branches (the state must carry no signature).

    Every module gets the same number of new factor rows, branches where it carries bits and zeros elsewhere,
    and every module's factors are mixed, so nothing shows which modules carry what.
    """
    key, strength = check_key(key), check_strength(strength)
    used, added = _carriers(state, len(bits))
    out = dict(state)
    for module, (a, b) in formats.lora_modules(state).items():
        down, up = a.double(), b.double()
        out_f, in_f = up.shape[0], down.shape[1]
        rows, cols = torch.zeros(added, in_f, dtype=torch.float64), torch.zeros(out_f, added, dtype=torch.float64)
        carried = used.get(module, [])
        if carried:
            t, v = probes(key, module, in_f, out_f)
            norm = float(torch.linalg.matrix_norm(up @ down))
            eps = strength * max(norm, 1e-6) / math.sqrt(out_f * in_f - strength**2 * len(carried))
            for i, slot in enumerate(carried):
                rows[i] = t[slot.index] * math.sqrt(eps)
                cols[:, i] = (2 * bits[slot.bit] - 1) * v[slot.index] * math.sqrt(eps)
        down, up = torch.cat([down, rows]), torch.cat([up, cols], dim=1)
        q = mixer(key, module, down.shape[0])
        out[f"{module}.lora_A.weight"] = (q @ down).to(a.dtype).contiguous()
        out[f"{module}.lora_B.weight"] = (up @ q.T).to(b.dtype).contiguous()
    return out


def unmark_state(state: dict[str, torch.Tensor], bits_count: int, key: str = "") -> dict[str, torch.Tensor]:
    """The state without the branches of a `bits_count`-bit signature made with `key` (the factors as they were
    before marking, up to rounding). Refuses factors that are not the ones marking wrote."""
    key = check_key(key)
    if isinstance(bits_count, bool) or not isinstance(bits_count, int) or not 1 <= bits_count <= CAPACITY:
        raise WatermarkError(f"the recorded signature length {bits_count!r} is not one this scheme writes")
    used, added = _carriers(state, bits_count)
    changed = WatermarkError("the package's factors are not the ones its signature was written into (made again "
                             "by another tool, or signed with another key); sign an unsigned copy")
    out = dict(state)
    for module, (a, b) in formats.lora_modules(state).items():
        rank = a.shape[0] - added
        if rank < 1:
            raise changed
        q = mixer(key, module, a.shape[0])
        down, up = q.T @ a.double(), b.double() @ q
        carried = used.get(module, [])
        if carried:
            t, _ = probes(key, module, down.shape[1], up.shape[0])
            rows = down[rank: rank + len(carried)]
            expected = torch.stack([t[s.index] for s in carried])
            cosine = (rows * expected).sum(1) / rows.norm(dim=1).clamp_min(1e-30)
            if not bool((cosine > 0.999).all()):
                raise changed
        padding = down[rank + len(carried):]
        if padding.numel() and float(padding.abs().max()) > 1e-6 * max(float(down.abs().max()), 1e-30):
            raise changed
        out[f"{module}.lora_A.weight"] = down[:rank].to(a.dtype).contiguous()
        out[f"{module}.lora_B.weight"] = up[:, :rank].to(b.dtype).contiguous()
    return out


@dataclass
class Reading:
    """What the probes read: per bit the mean z over its slots, and the bits that reach DETECT."""

    z: list[float]
    capacity: int

    def bits(self, count: int | None = None) -> list[int | None]:
        """Each bit's value, None where it is not read; `count` bits, or the read ones from the first on."""
        values = [(1 if z > 0 else 0) if abs(z) >= DETECT else None for z in self.z]
        if count is not None:
            return values[:count]
        length = 0
        while length < len(values) and values[length] is not None:
            length += 1
        return values[:length]

    @property
    def signed(self) -> bool:
        return bool(self.bits())


@torch.no_grad()
def read_state(state: dict[str, torch.Tensor], key: str = "") -> Reading:
    """Query every slot's module with its probe input t and read the answer along v (the layer as a function
    x -> B A x; the factors are not looked at one by one)."""
    key = check_key(key)
    modules = formats.lora_modules(state)
    slots, capacity = layout(_shapes(state))
    sums, counts = [0.0] * capacity, [0] * capacity
    cache: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for slot in slots:
        if slot.module not in cache:
            a, b = modules[slot.module]
            down, up = a.double(), b.double()
            t, v = probes(key, slot.module, down.shape[1], up.shape[0])
            answers = up @ (down @ t.T)  # (d_out, SLOTS): the layer's output for each probe input
            spread = float(torch.linalg.matrix_norm(up @ down)) / math.sqrt(up.shape[0] * down.shape[1])
            cache[slot.module] = (answers, v, spread)
        answers, v, spread = cache[slot.module]
        q = float(v[slot.index] @ answers[:, slot.index])
        sums[slot.bit] += q / spread if spread > 0 else 0.0
        counts[slot.bit] += 1
    return Reading([s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)], capacity)


def record(bits_count: int, strength: float, key: str) -> dict:
    """What a marked package says of its mark (never the signature or the key)."""
    return {"scheme": SCHEME, "bits": bits_count, "strength": strength, "keyed": bool(key)}


def recorded_bits(meta: object) -> int | None:
    """The signature length a package's record gives, None when it records no mark of this scheme."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    if not isinstance(meta, dict) or meta.get("scheme") != SCHEME:
        return None
    bits = meta.get("bits")
    return bits if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= CAPACITY else None


# -- packages -----------------------------------------------------------------------------------------------


@dataclass
class Verification:
    """A package's signature as read: the bits (None where one does not read) and each bit's mean z."""

    package: str
    part: str
    bits: list[int | None]
    z: list[float]

    @property
    def text(self) -> str:
        return "".join("-" if b is None else str(b) for b in self.bits)


def mark_package(folder, signature: str, *, key: str = "", strength: float = DEFAULT_STRENGTH, out=None,
                 replace: bool = False):
    """Write `signature` into every weight file of the package at `folder` (in place, or as a copy at `out`).

    A package that carries a signature already gets its branches swapped for the new signature's (the old ones
    come out with the same key; nothing is trained). Returns the package's path.
    """
    bits = parse_bits(signature)
    key, strength = check_key(key), check_strength(strength)
    package = AdapterPackage.open(folder)
    trained = trained_factors(package)
    if trained and out is None:
        raise WatermarkError(f"package {package.name} keeps its trained factors ({trained}) to be exported at other "
                             "ranks, and those exports would carry no signature; sign a copy instead (--out), which "
                             "holds this rank only")
    previous = recorded_bits(package.info.get("watermark"))
    states = {}
    for part in package.parts():
        state = package.state_dict(part)
        if previous is not None:
            state = unmark_state(state, previous, key)
        capacity = capacity_of(state)
        if len(bits) > capacity:
            where = f"package {package.name}" + (f" ({part} part)" if part != "full" else "")
            raise WatermarkError(f"the signature has {len(bits)} bits but {where} can hold at most {capacity}; "
                                 "use a shorter signature")
        states[part] = mark_state(state, bits, key, strength)
    info = dict(package.info)
    info["watermark"] = record(len(bits), strength, key)
    if out is not None:
        info["name"] = check_name(Path(out).name)
    card = None
    if isinstance(info.get("merge"), dict):  # a merged style package keeps the card of its kind
        from pipelines.merge import merged_card

        card = merged_card(PackageInfo.from_dict(info))
    return rewrite_weights(folder, folder if out is None else out, states, info, card=card,
                           replace=True if out is None else replace, leave_out=(trained,) if trained else ())


def trained_factors(package: AdapterPackage) -> str | None:
    """The file of a DyLoRA or SoRA package's trained factors (from which it exports at other ranks), if it has
    one. A signed copy leaves it out: an export from those factors would carry no signature."""
    from pipelines.rank_export import RANK_ADAPTERS, trained_file

    adapter = package.info.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("type") not in RANK_ADAPTERS:
        return None
    name = trained_file(adapter["type"])
    return name if (package.path / name).is_file() else None


def verify_package(folder, *, key: str = "", part: str = "full") -> Verification:
    """Read the signature of one weight file of a package (its whole adapter by default) by querying its layers.

    A package that carries no signature readable with `key` is refused with one line saying so.
    """
    key = check_key(key)
    package = AdapterPackage.open(folder)
    if part not in package.parts():
        raise WatermarkError(f"package {package.name} has no {part!r} part (it has {', '.join(package.parts())})")
    tensors, metadata = formats.read_safetensors(package.file(part))
    recorded = recorded_bits(metadata.get(METADATA_KEY)) or recorded_bits(package.info.get("watermark"))
    reading = read_state(package.state_dict(part), key)
    bits = reading.bits(recorded)
    if not bits or all(b is None for b in bits):
        if recorded is not None:
            raise WatermarkError(f"package {package.name} is recorded as signed, but no signature reads with this "
                                 "key; give the key it was signed with")
        raise WatermarkError(f"package {package.name} carries no MarkBoard signature"
                             + (" readable with this key" if key else ""))
    if any(b is None for b in bits):
        missing = ", ".join(str(i) for i, b in enumerate(bits) if b is None)
        raise WatermarkError(f"package {package.name}: bits {missing} of its {len(bits)}-bit signature do not read; "
                             "the package was changed after it was signed")
    return Verification(package.name, part, bits, reading.z[: len(bits)])
