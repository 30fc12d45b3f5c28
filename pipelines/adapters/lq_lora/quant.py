"""LQ-LoRA's quantiser in plain torch: blockwise absmax over a NormalFloat or integer grid, with its scales
quantised again (double quantisation), and the exact number of bits a matrix takes in each format.

A format `QuantFormat(grid, bits, block_size, scale_bits, scale_dtype, scale_block_size)` is the official
code's `QuantConfig(num_bits, num_bits_0, num_bits_1, block_size_0, block_size_1)` plus the grid
(HanGuo97/lq-lora, models/quantization_utils.py and quantization_utils_2.py):

- the matrix is read row-major in blocks of `block_size` (B0) numbers; each block's absmax is its scale, and
  every number becomes the index (`bits` wide) of the nearest grid value to number / scale;
- the scales are stored again: their minimum is kept as one fp32 offset, and the scales minus the offset are
  cut into groups of `scale_block_size` (B1), each group's absmax stored in `scale_dtype` (b1) and its members
  as unsigned `scale_bits` (b0) integers, `round(s * (2^b0 - 1) / absmax)` (pytorch-quantization's unsigned
  `tensor_quant`, as the official code calls it);
- the NormalFloat grid is the official one: the quantiles `linspace(1 - 0.9677083, 0.5, 2^(b-1))` and
  `linspace(0.5, 0.9677083, 2^(b-1) + 1)` of a normal law scaled so that the last is 1 (NF4 for b = 4). The
  integer grid is the official "blockwise-int" one, symmetric and narrow: k / (2^(b-1) - 1) for
  |k| <= 2^(b-1) - 1.

Choices of ours, each visible in the format:
- `scale_bits=0` stores the block scales themselves in `scale_dtype` (QLoRA without double quantisation). The
  paper's grid always double-quantises; bitsandbytes on a GPU quantises this format (NF4, fp32 scales) itself.
- A matrix whose size is not a multiple of B0 (or whose scale count is not a multiple of B1) ends in a shorter
  block; the official code requires exact multiples. Its zero padding changes no absmax.
- `storage_bits` counts what is stored exactly (codes, scale codes, group scales, the offset) for the real
  number of blocks; the official `estimate_storage_from_config` counts b + b0/B0 + b1/(B0 B1) bits a number,
  which is the same for large matrices and leaves out the padding of small ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

GRIDS = ("nf", "int")
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALE_DTYPE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
NF_OFFSET = 0.9677083  # the official constant: the outermost NF4 quantile
_FORMAT_RE = re.compile(r"(nf|int)([2-8])-([1-9][0-9]{0,4})-([0-8])-(bf16|fp16|fp32)-([1-9][0-9]{0,4})")
BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class FormatError(ValueError):
    """A format name that does not parse."""


@dataclass(frozen=True)
class QuantFormat:
    """One way to store a matrix: grid and bits, block size, and how the block scales are stored."""

    grid: str = "nf"
    bits: int = 4  # b: bits per number
    block_size: int = 64  # B0: numbers sharing one scale
    scale_bits: int = 8  # b0: bits per block scale (0: scales stored as scale_dtype floats)
    scale_dtype: str = "fp32"  # b1: the dtype of the second-level scales
    scale_block_size: int = 256  # B1: block scales sharing one second-level scale

    @property
    def name(self) -> str:
        """`nf4-64-8-fp32-256`: grid and bits, B0, b0, b1, B1."""
        return (f"{self.grid}{self.bits}-{self.block_size}-{self.scale_bits}-{self.scale_dtype}-"
                f"{self.scale_block_size}")

    @classmethod
    def parse(cls, text: str) -> QuantFormat:
        match = _FORMAT_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise FormatError(f"quantisation format {text!r} must look like 'nf4-64-8-fp32-256': grid nf or int "
                              "with 2-8 bits, block size, scale bits 0-8, scale dtype bf16/fp16/fp32, scale "
                              "block size")
        grid, bits, block, scale_bits, dtype, scale_block = match.groups()
        return cls(grid, int(bits), int(block), int(scale_bits), dtype, int(scale_block))

    @property
    def double_quantized(self) -> bool:
        return self.scale_bits > 0

    def values(self) -> torch.Tensor:
        """The grid: 2^bits (NF) or 2^bits - 1 (int) sorted values in [-1, 1]."""
        return _grid_values(self.grid, self.bits).clone()

    def blocks(self, numel: int) -> tuple[int, int]:
        """(first-level blocks, second-level groups) for a matrix of `numel` numbers."""
        blocks = math.ceil(numel / self.block_size)
        return blocks, math.ceil(blocks / self.scale_block_size)

    def storage_bits(self, numel: int) -> int:
        """The bits a matrix of `numel` numbers takes in this format, everything stored counted."""
        blocks, groups = self.blocks(numel)
        if not self.double_quantized:
            return numel * self.bits + blocks * SCALE_DTYPE_BITS[self.scale_dtype]
        return numel * self.bits + blocks * self.scale_bits + groups * SCALE_DTYPE_BITS[self.scale_dtype] + 32

    def official_storage_bits(self, numel: int) -> float:
        """The official estimate, (b + b0/B0 + b1/(B0 B1)) bits a number."""
        b1 = SCALE_DTYPE_BITS[self.scale_dtype]
        if not self.double_quantized:
            return numel * (self.bits + b1 / self.block_size)
        return numel * (self.bits + self.scale_bits / self.block_size + b1 / (self.block_size * self.scale_block_size))


def paper_grid() -> list[QuantFormat]:
    """The official ILP grid: b in {2,3,4,8} x b0 in {2,3,4,8} x b1 in {bf16,fp16,fp32} x B0 in {16,32,64} x
    B1 in {16,64,256}, NormalFloat (432 formats)."""
    return [QuantFormat("nf", b, b_0, b0, b1, b_1)
            for b in (2, 3, 4, 8) for b0 in (2, 3, 4, 8) for b1 in ("bf16", "fp16", "fp32")
            for b_0 in (16, 32, 64) for b_1 in (16, 64, 256)]


@lru_cache(maxsize=32)
def _grid_values(grid: str, bits: int) -> torch.Tensor:
    if grid == "int":
        top = 2 ** (bits - 1) - 1
        return torch.arange(-top, top + 1, dtype=torch.float64).div(top).float()
    # The official construction (create_normal_float_scheme), in float64 then rounded to fp32.
    sigma = -1.0 / (math.sqrt(2.0) * torch.erfinv(torch.tensor(1.0 - 2.0 * NF_OFFSET, dtype=torch.float64)))
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), sigma)
    left = torch.linspace(1.0 - NF_OFFSET, 0.5, 2 ** (bits - 1), dtype=torch.float64)
    right = torch.linspace(0.5, NF_OFFSET, 2 ** (bits - 1) + 1, dtype=torch.float64)
    return normal.icdf(torch.cat([left[:-1], right])).float()


def _nearest(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The index of the nearest grid value (ties to the lower one), as the official bucketize does."""
    boundaries = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(values, boundaries, right=False)


def _uint_quantize(values: torch.Tensor, amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned `bits`-bit codes of `values` (>= 0) against `amax` per row, and their dequantised values."""
    top = 2.0**bits - 1.0
    positive = amax > 0
    factor = torch.where(positive, top / torch.where(positive, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    codes = torch.round(values * factor).clamp(0, top)
    dequantized = torch.where(positive, codes / torch.where(positive, factor, torch.ones_like(factor)),
                              torch.zeros_like(codes))
    return codes.to(torch.uint8), dequantized


def quantize(weight: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """The stored form of `weight` in `fmt`: `codes` (uint8, one per number, padded to whole blocks),
    `scales` (uint8 scale codes, or the scales as `scale_dtype` floats without double quantisation), and with
    double quantisation `scale_scales` (`scale_dtype`, one per group) and `offset` (fp32, one)."""
    flat = weight.detach().float().reshape(-1)
    numel = flat.numel()
    blocks, groups = fmt.blocks(numel)
    padded = F.pad(flat, (0, blocks * fmt.block_size - numel)).view(blocks, fmt.block_size)
    absmax = padded.abs().amax(dim=1)
    dtype = SCALE_DTYPES[fmt.scale_dtype]
    stored: dict[str, torch.Tensor] = {}
    if fmt.double_quantized:
        offset = absmax.min()
        shifted = F.pad(absmax - offset, (0, groups * fmt.scale_block_size - blocks)).view(groups, -1)
        group_max = shifted.amax(dim=1).to(dtype)
        codes, dequantized = _uint_quantize(shifted, group_max.float()[:, None], fmt.scale_bits)
        scales = dequantized.reshape(-1)[:blocks] + offset
        stored.update(scales=codes.reshape(-1)[:blocks].contiguous(), scale_scales=group_max,
                      offset=offset.reshape(1))
    else:
        stored["scales"] = absmax.to(dtype)
        scales = stored["scales"].float()
    grid = _grid_values(fmt.grid, fmt.bits).to(flat.device)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    stored["codes"] = _nearest(padded / safe[:, None], grid).to(torch.uint8).reshape(-1)
    return {key: stored[key] for key in stored_names(fmt)}


def stored_names(fmt: QuantFormat) -> tuple[str, ...]:
    return ("codes", "scales", "scale_scales", "offset") if fmt.double_quantized else ("codes", "scales")


def stored_shapes(fmt: QuantFormat, numel: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of each stored tensor of a `numel`-number matrix (what `quantize` returns)."""
    blocks, groups = fmt.blocks(numel)
    dtype = SCALE_DTYPES[fmt.scale_dtype]
    shapes = {"codes": ((blocks * fmt.block_size,), torch.uint8),
              "scales": ((blocks,), torch.uint8 if fmt.double_quantized else dtype)}
    if fmt.double_quantized:
        shapes.update(scale_scales=((groups,), dtype), offset=((1,), torch.float32))
    return shapes


def block_scales(stored: dict[str, torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """The dequantised first-level scale of every block (fp32)."""
    if not fmt.double_quantized:
        return stored["scales"].float()
    blocks = stored["scales"].numel()
    groups = stored["scale_scales"].numel()
    codes = F.pad(stored["scales"].float(), (0, groups * fmt.scale_block_size - blocks)).view(groups, -1)
    amax = stored["scale_scales"].float()[:, None]
    top = 2.0**fmt.scale_bits - 1.0
    positive = amax > 0
    factor = torch.where(positive, top / torch.where(positive, amax, torch.ones_like(amax)), torch.ones_like(amax))
    dequantized = torch.where(positive, codes / factor, torch.zeros_like(codes))
    return dequantized.reshape(-1)[:blocks] + stored["offset"].float()


def dequantize(stored: dict[str, torch.Tensor], fmt: QuantFormat, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 matrix of shape `shape` that `stored` holds."""
    grid = _grid_values(fmt.grid, fmt.bits).to(stored["codes"].device)
    codes = stored["codes"].long()
    if codes.numel() and int(codes.max()) >= grid.numel():
        raise ValueError(f"quantisation codes reach {int(codes.max())}, beyond the {grid.numel()} values of "
                         f"{fmt.name}")
    values = grid[codes].view(-1, fmt.block_size) * block_scales(stored, fmt)[:, None]
    numel = math.prod(shape)
    return values.reshape(-1)[:numel].reshape(shape)


def quantize_dequantize(weight: torch.Tensor, fmt: QuantFormat, backend: str = "auto") -> tuple[
        torch.Tensor, dict[str, torch.Tensor]]:
    """`weight` through `fmt` and back (fp32), and its stored form. With `backend="auto"` a CUDA tensor in the
    format bitsandbytes implements (NF4, fp32 block scales, no double quantisation, a block size it supports)
    is quantised by bitsandbytes when it is installed; everything else by the torch code above."""
    stored = None
    if backend == "auto" and weight.is_cuda and bitsandbytes_handles(fmt):
        stored = _bitsandbytes_quantize(weight, fmt)
    if stored is None:
        stored = quantize(weight, fmt)
    return dequantize(stored, fmt, tuple(weight.shape)), stored


def bitsandbytes_handles(fmt: QuantFormat) -> bool:
    return (fmt.grid == "nf" and fmt.bits == 4 and not fmt.double_quantized and fmt.scale_dtype == "fp32"
            and fmt.block_size in BNB_BLOCK_SIZES)


def _bitsandbytes_quantize(weight: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor] | None:
    """bitsandbytes' NF4 codes and fp32 block absmax, in the layout of `quantize` (None without bitsandbytes).

    bitsandbytes packs two codes a byte, the first in the high nibble, and indexes the same 16 NF4 values in
    the same order as the official table (the same QLoRA construction, rounded independently)."""
    try:
        import bitsandbytes.functional as bnb
    except Exception:  # not installed, or built without this GPU's support
        return None
    flat = weight.detach().float().reshape(-1)
    blocks, _ = fmt.blocks(flat.numel())
    padded = F.pad(flat, (0, blocks * fmt.block_size - flat.numel())).contiguous()
    packed, state = bnb.quantize_4bit(padded, blocksize=fmt.block_size, compress_statistics=False,
                                      quant_type="nf4")
    packed = packed.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: padded.numel()]
    return {"codes": codes.to(torch.uint8).contiguous(), "scales": state.absmax.float().reshape(-1)[:blocks]}
