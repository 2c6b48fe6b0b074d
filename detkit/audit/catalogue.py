"""The ops the audit measures, each a small data-like spec.

A spec says how to build seeded inputs at the largest batch size, how to call the op
*as ordinary torch user code* (so that ``detkit.batch_invariant()`` and
``use_deterministic_algorithms`` act on it exactly as they would on a model), and which
inputs carry the batch: those are sliced along dim 0 for the batch sweep, and the
output's dim 0 is the batch. Shapes are typical of LLM layers; ``hidden`` rescales the
model width of every spec at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detkit.errors import InputError

Outputs = tuple[torch.Tensor, ...]

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DEFAULT_HIDDEN = 4096
MOE_EXPERTS = 8


@dataclass(frozen=True)
class Inputs:
    """Tensors of one op call: ``batched`` ones carry the batch in dim 0, ``fixed`` do not."""

    batched: Mapping[str, torch.Tensor]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.batched.values()}
        if len(sizes) > 1:
            raise ValueError(f"batched inputs disagree on the batch size: {sorted(sizes)}")

    @property
    def batch(self) -> int:
        return next(iter(self.batched.values())).shape[0]

    def rows(self, index: slice | torch.Tensor) -> Inputs:
        """The same call restricted to (or reordered along) the batch."""
        return Inputs({k: v[index] for k, v in self.batched.items()}, self.fixed)

    def to(self, device: torch.device) -> Inputs:
        return Inputs(
            {k: v.to(device) for k, v in self.batched.items()},
            {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.fixed.items()},
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        """Shapes (at the largest batch) and dtypes, for the report."""
        out: dict[str, dict[str, Any]] = {}
        for kind, group in (("batched", self.batched), ("fixed", self.fixed)):
            for name, value in group.items():
                if isinstance(value, torch.Tensor):
                    out[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                                 "batched": kind == "batched"}
        return out

    def all(self) -> dict[str, Any]:
        return {**self.fixed, **self.batched}


Builder = Callable[[int, torch.dtype, np.random.Generator, int], Inputs]


@dataclass(frozen=True)
class OpSpec:
    """One op of the catalogue.

    ``build(batch, dtype, rng, hidden)`` returns CPU inputs drawn from the numpy ``rng``; ``call(**inputs)``
    is the torch user code; it may return a tuple (topk: values and indices). Integer
    outputs are compared for equality only (no ULP distance). ``attention`` enables the
    padding and decode-vs-prefill checks.
    """

    name: str
    family: str
    summary: str
    build: Builder
    call: Callable[..., torch.Tensor | Outputs]
    attention: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"op name must be an identifier, got {self.name!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")

    def run(self, inputs: Inputs) -> Outputs:
        out = self.call(**inputs.all())
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


FAMILIES = ("matmul", "normalization", "reduction", "attention", "scatter", "selection", "activation", "convolution",
            "resampling")


def _randn(g: np.random.Generator, shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    # Drawn in float32 and rounded once, so every dtype sees the same underlying values.
    x = g.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return torch.from_numpy(x).to(dtype)


def _randint(g: np.random.Generator, high: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(g.integers(0, high, shape, dtype=np.int64))


def _scale(hidden: int, fraction: int) -> int:
    return max(8, hidden // fraction)


# --- builders -------------------------------------------------------------------------
# ``hidden`` is the model width (default 4096); other sizes follow it so that one option
# shrinks or grows the whole suite.


def _b_mm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, h), dt)}, {"mat2": _randn(g, (h, h), dt, h**-0.5)})


def _b_addmm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    n = _scale(h, 4)  # a k/v projection: hidden -> hidden / 4
    return Inputs(
        {"mat1": _randn(g, (b, h), dt)},
        {"bias": _randn(g, (n,), dt), "mat2": _randn(g, (h, n), dt, h**-0.5)},
    )


def _b_bmm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # attention scores of one head group: (b, 16 queries, 128) x (b, 128, 256 keys)
    return Inputs({"input": _randn(g, (b, 16, 128), dt), "mat2": _randn(g, (b, 128, 256), dt)})


def _b_matmul(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # (batch, 4 tokens, hidden) @ (hidden, hidden / 4): torch folds batch and tokens into M
    n = _scale(h, 4)
    return Inputs({"input": _randn(g, (b, 4, h), dt)}, {"other": _randn(g, (h, n), dt, h**-0.5)})


def _b_linear(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, h), dt)}, {"weight": _randn(g, (h, h), dt, h**-0.5)})


def _b_grouped_mm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # an MoE layer's experts: every token routed to one of 8 experts of hidden -> hidden / 4
    n = _scale(h, 4)
    return Inputs({"input": _randn(g, (b, h), dt), "expert": _randint(g, MOE_EXPERTS, (b,))},
                  {"weight": _randn(g, (MOE_EXPERTS, n, h), dt, h**-0.5)})


def _b_solve(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # b right-hand sides (rows) against one unit lower-triangular system of hidden / 16
    # (256 at 4096); entries small enough that forward substitution stays well scaled
    n = _scale(h, 16)
    return Inputs({"input": _randn(g, (b, n), dt)}, {"system": _randn(g, (n, n), dt, 0.5 * n**-0.5)})


def _c_solve(input: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
    # in float32 whatever the dtype, as Qwen3-Next's gated delta rule solves (torch has no
    # 16-bit kernel); X A = B: each row of the batch is one right-hand side
    x = torch.linalg.solve_triangular(system.float(), input.float(), upper=False, left=False, unitriangular=True)
    return x.to(input.dtype)


def _b_row(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, h), dt, 3.0)})


def _b_vocab(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, 8 * h), dt, 4.0)})  # logits over a 32k vocabulary


def _b_long_vocab(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # 131,072 at 4096, Llama 3's vocabulary: a lone row this long is what torch's CPU sum
    # splits across threads
    return Inputs({"input": _randn(g, (b, 32 * h), dt, 4.0)})


def _b_layer_norm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs(
        {"input": _randn(g, (b, h), dt, 3.0)},
        {"weight": _randn(g, (h,), dt), "bias": _randn(g, (h,), dt)},
    )


def _b_rms_norm(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, h), dt, 3.0)}, {"weight": _randn(g, (h,), dt)})


def _b_attention(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # 4 heads of 64 over 128 tokens at hidden 4096: a slice of a layer, enough to exercise
    # the kernel's blocking over keys while keeping the suite fast
    heads = max(1, h // 1024)
    return Inputs({name: _randn(g, (b, heads, 128, 64), dt) for name in ("query", "key", "value")})


def _b_index_add(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # each batch row adds 512 source rows into 64 slots: many collisions per slot
    index = _randint(g, 64, (512,))
    return Inputs({"source": _randn(g, (b, 512, 64), dt)}, {"index": index})


def _b_scatter_add(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    index = _randint(g, 64, (b, h))
    return Inputs({"src": _randn(g, (b, h), dt), "index": index})


def _b_embedding_bag(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs(
        {"input": _randint(g, 1000, (b, 32))},
        {"weight": _randn(g, (1000, _scale(h, 4)), dt)},
    )


def _mlp_width(h: int) -> int:
    return max(8, h * 43 // 16)  # Llama-7B's 11008 at hidden 4096; tiny-llama's 688 at 256


def _b_mlp(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    return Inputs({"input": _randn(g, (b, _mlp_width(h)), dt, 3.0)})


def _b_causal_conv(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # Mamba's conv: one kernel-4 filter per channel (hidden channels) over 32 tokens
    return Inputs({"input": _randn(g, (b, h, 32), dt)},
                  {"weight": _randn(g, (h, 1, 4), dt, 0.5), "bias": _randn(g, (h,), dt)})


def _b_patches(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # a ViT patch embedding: 64 x 64 RGB images, 16 x 16 patches, hidden/4 filters
    return Inputs({"input": _randn(g, (b, 3, 64, 64), dt)},
                  {"weight": _randn(g, (_scale(h, 4), 3, 16, 16), dt, 768**-0.5), "bias": _randn(g, (_scale(h, 4),), dt)})


def _b_images(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # RGB images of 37 x 41, resized (an image processor's or a tower's resize)
    return Inputs({"input": _randn(g, (b, 3, 37, 41), dt)})


def _b_table_points(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # GLM-4V: a 24 x 24 position table of hidden/16 channels, resampled at 64 points an image
    points = g.uniform(-1.0, 1.0, (b, 64, 1, 2)).astype(np.float32)
    return Inputs({"input": _randn(g, (b, _scale(h, 16), 24, 24), dt), "grid": torch.from_numpy(points).to(dt)})


def _b_angles(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # RoPE angles (position x frequency, head dim 128, base 10000) of hidden/64 consecutive
    # tokens from a random start in a 4096-token context; in numpy, since torch's pow is
    # itself ISA variant. Most of them are small, where torch's vector and scalar sin differ.
    freqs = (10000.0 ** (-np.arange(64) / 64)).astype(np.float32)
    starts = g.integers(0, 4096, b)
    positions = (starts[:, None] + np.arange(max(1, h // 64))[None]).astype(np.float32)
    angles = (positions[:, :, None] * freqs[None, None]).reshape(b, -1)
    return Inputs({"input": torch.from_numpy(angles).to(dt)})


def _b_ties(b: int, dt: torch.dtype, g: np.random.Generator, h: int) -> Inputs:
    # 4 distinct values over 8*hidden logits: every row is full of ties at its maximum
    return Inputs({"input": _randint(g, 4, (b, 8 * h)).to(dt)})


# --- calls: plain torch user code -----------------------------------------------------


def _c_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, is_causal=True)


def _c_grouped_mm(input: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # as transformers' grouped_mm experts: tokens sorted by expert, one grouped GEMM over
    # the transposed expert weights, results put back in token order
    order = torch.argsort(expert, stable=True)
    offs = torch.bincount(expert, minlength=weight.shape[0]).cumsum(0).to(torch.int32)
    out = torch._grouped_mm(input[order], weight.transpose(1, 2), offs=offs)
    return torch.empty_like(out).index_copy_(0, order, out)


def _c_index_add(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(source.shape[0], 64, source.shape[2], dtype=source.dtype, device=source.device)
    return out.index_add_(1, index, source)


def _c_scatter_add(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(src.shape[0], 64, dtype=src.dtype, device=src.device)
    return out.scatter_add_(1, index, src)


def _c_rms_norm(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(input, (input.shape[-1],), weight, eps=1e-6)


def _c_layer_norm(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(input, (input.shape[-1],), weight, bias, eps=1e-5)


def _c_topk(input: torch.Tensor) -> Outputs:
    values, indices = torch.topk(input, 8, dim=-1)
    return values, indices


CATALOGUE: tuple[OpSpec, ...] = (
    OpSpec("mm", "matmul", "torch.mm(x, W): (b, hidden) x (hidden, hidden)", _b_mm,
           lambda input, mat2: torch.mm(input, mat2)),
    OpSpec("addmm", "matmul", "torch.addmm(bias, x, W): hidden -> hidden/4 with bias", _b_addmm,
           lambda bias, mat1, mat2: torch.addmm(bias, mat1, mat2)),
    OpSpec("bmm", "matmul", "torch.bmm: (b, 16, 128) x (b, 128, 256), attention-score sized", _b_bmm,
           lambda input, mat2: torch.bmm(input, mat2)),
    OpSpec("matmul", "matmul", "x @ W: (b, 4 tokens, hidden) @ (hidden, hidden/4)", _b_matmul,
           lambda input, other: torch.matmul(input, other)),
    OpSpec("linear", "matmul", "F.linear(x, W): (b, hidden) -> hidden, no bias", _b_linear,
           lambda input, weight: F.linear(input, weight)),
    OpSpec("grouped_mm", "matmul",
           f"torch._grouped_mm: MoE experts, each token to one of {MOE_EXPERTS} experts of hidden -> hidden/4",
           _b_grouped_mm, _c_grouped_mm),
    OpSpec("solve_triangular", "matmul",
           "torch.linalg.solve_triangular(A, x, left=False) in float32: rows of hidden/16 against one unit lower "
           "triangular A", _b_solve, _c_solve),
    OpSpec("softmax", "normalization", "F.softmax over hidden", _b_row,
           lambda input: F.softmax(input, dim=-1)),
    OpSpec("log_softmax", "normalization", "F.log_softmax over a vocabulary of 8*hidden", _b_vocab,
           lambda input: F.log_softmax(input, dim=-1)),
    OpSpec("layer_norm", "normalization", "F.layer_norm over hidden, with weight and bias", _b_layer_norm,
           _c_layer_norm),
    OpSpec("rms_norm", "normalization", "F.rms_norm over hidden, with weight", _b_rms_norm, _c_rms_norm),
    OpSpec("sum", "reduction", "x.sum(-1) over hidden", _b_row, lambda input: input.sum(dim=-1)),
    OpSpec("mean", "reduction", "x.mean(-1) over hidden", _b_row, lambda input: input.mean(dim=-1)),
    OpSpec("cumsum", "reduction", "x.cumsum(-1) over hidden", _b_row, lambda input: input.cumsum(dim=-1)),
    OpSpec("logsumexp", "reduction", "torch.logsumexp over a vocabulary of 32*hidden (a trainer's log-probs)",
           _b_long_vocab, lambda input: torch.logsumexp(input, dim=-1)),
    OpSpec("scaled_dot_product_attention", "attention",
           "F.scaled_dot_product_attention, causal, (b, hidden/1024 heads, 128 tokens, 64)",
           _b_attention, _c_attention, attention=True),
    OpSpec("index_add", "scatter", "zeros(b, 64, 64).index_add_(1, idx, src): 512 rows into 64 slots",
           _b_index_add, _c_index_add),
    OpSpec("scatter_add", "scatter", "zeros(b, 64).scatter_add_(1, idx, src): hidden values into 64 slots",
           _b_scatter_add, _c_scatter_add),
    OpSpec("embedding_bag", "scatter", "F.embedding_bag(ids (b, 32), W (1000, hidden/4), mode='sum')",
           _b_embedding_bag, lambda input, weight: F.embedding_bag(input, weight, mode="sum")),
    OpSpec("argmax", "selection", "x.argmax(-1) over 8*hidden logits holding 4 distinct values (ties)",
           _b_ties, lambda input: input.argmax(dim=-1)),
    OpSpec("topk", "selection", "torch.topk(x, 8) over 8*hidden logits holding 4 distinct values (ties)",
           _b_ties, _c_topk),
    OpSpec("silu", "activation", "F.silu over the MLP width (43/16 of hidden: 11008 at 4096)", _b_mlp,
           lambda input: F.silu(input)),
    OpSpec("gelu", "activation", "F.gelu(approximate='tanh') over the MLP width (Gemma's activation)", _b_mlp,
           lambda input: F.gelu(input, approximate="tanh")),
    OpSpec("rope", "activation", "torch.cos and torch.sin of RoPE angles: hidden/64 tokens x 64 frequencies", _b_angles,
           lambda input: torch.cat([torch.cos(input), torch.sin(input)], dim=-1)),
    OpSpec("conv1d", "convolution",
           "F.conv1d: Mamba's causal depthwise conv, hidden channels x 32 tokens, kernel 4, padding 3",
           _b_causal_conv, lambda input, weight, bias: F.conv1d(input, weight, bias, padding=3,
                                                                groups=weight.shape[0])[..., :input.shape[-1]]),
    OpSpec("conv2d", "convolution", "F.conv2d: a ViT patch embedding, 64 x 64 images, 16 x 16 patches, hidden/4 filters",
           _b_patches, lambda input, weight, bias: F.conv2d(input, weight, bias, stride=16)),
    OpSpec("interpolate", "resampling", "F.interpolate(mode='bilinear'): RGB images, 37 x 41 to 90 x 100", _b_images,
           lambda input: F.interpolate(input, size=(90, 100), mode="bilinear", align_corners=False)),
    OpSpec("grid_sample", "resampling",
           "F.grid_sample(mode='bicubic', padding_mode='border'): GLM-4V's 24 x 24 position table, hidden/16 "
           "channels, at 64 points", _b_table_points,
           lambda input, grid: F.grid_sample(input, grid, mode="bicubic", padding_mode="border", align_corners=False)),
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in CATALOGUE}
ALIASES = {"sdpa": "scaled_dot_product_attention", "attention": "scaled_dot_product_attention"}


def resolve_ops(names: list[str] | None) -> list[OpSpec]:
    """Specs for the given names (catalogue order); all of them for None."""
    if not names:
        return list(CATALOGUE)
    wanted: list[str] = []
    for raw in names:
        name = ALIASES.get(raw.strip(), raw.strip())
        if name not in OPS:
            raise InputError(
                f"unknown op {raw!r}; known ops: {', '.join(OPS)} (aliases: {', '.join(ALIASES)}); "
                "see `detkit audit --list-ops`"
            )
        if name not in wanted:
            wanted.append(name)
    return [spec for spec in CATALOGUE if spec.name in wanted]


def build_inputs(spec: OpSpec, batch: int, dtype: torch.dtype, seed: int, hidden: int) -> Inputs:
    """Seeded CPU inputs of ``spec`` at ``batch`` rows: the same seed gives the same bits.

    Drawn with numpy's PCG64 generator, not torch.randn: torch's normal sampler is
    vectorized per CPU instruction set (its bits change with ATEN_CPU_CAPABILITY), which
    would make the ISA check compare different inputs; numpy's draws are the same on
    every x86/ARM machine, so reports from different machines audit the same values.
    """
    return spec.build(batch, dtype, np.random.default_rng(seed), hidden)
