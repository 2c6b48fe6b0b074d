"""The audit's checks and the bitwise comparison they share.

Every check compares outputs *bitwise* (raw bit patterns, so -0 vs +0 and NaN payloads
count); for floating outputs the differing elements are also measured in ULPs with
``detkit.compare.ulp_distance``. Index outputs (argmax, topk indices) are compared for
equality only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detkit.audit.vocab import CHECK_HELP, CHECKS, VERDICTS, ulp_bucket_label
from detkit.compare import NAN_MISMATCH, ulp_distance

__all__ = ["CHECKS", "CHECK_HELP", "VERDICTS", "CheckResult", "Comparison", "compare", "digest",
           "ulp_bucket_label"]

# ULPs are bucketed by bit length: bucket k holds distances in [2**(k-1), 2**k).
_POWERS = np.array([1 << k for k in range(63)], dtype=np.int64)


@dataclass
class Comparison:
    """How one set of outputs differs from a reference, bitwise and in ULPs."""

    compared: int
    differing: int
    max_ulp: int | None  # None for index outputs, or when nothing differs
    max_abs: float | None = None  # largest absolute difference (finite pairs), for scale
    nan_mismatches: int = 0
    buckets: dict[int, int] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return self.differing == 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
        return t.contiguous().view(view)
    return t


def compare(outputs: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]) -> Comparison:
    """Bitwise comparison of two output tuples of the same op, with ULPs of differing floats."""
    if len(outputs) != len(reference):
        raise ValueError(f"the op returned {len(outputs)} outputs here and {len(reference)} in the reference")
    total = differing = nans = 0
    max_ulp: int | None = None
    max_abs: float | None = None
    buckets: dict[int, int] = {}
    for out, ref in zip(outputs, reference, strict=True):
        if out.shape != ref.shape or out.dtype != ref.dtype:
            raise ValueError(f"output {tuple(out.shape)}/{out.dtype} vs reference {tuple(ref.shape)}/{ref.dtype}")
        mask = _bits(out) != _bits(ref)
        n = int(mask.sum())
        total += out.numel()
        differing += n
        if n == 0 or not out.is_floating_point():
            continue
        a, b = out[mask].cpu(), ref[mask].cpu()
        d = ulp_distance(a, b)
        gap = (a.double() - b.double()).abs()
        gap = gap[torch.isfinite(gap)]
        if gap.numel():
            max_abs = max(max_abs or 0.0, float(gap.max()))
        nan = d == NAN_MISMATCH
        nans += int(nan.sum())
        d = d[~nan]
        if d.size:
            max_ulp = max(max_ulp or 0, int(d.max()))
            ks, counts = np.unique(np.searchsorted(_POWERS, d, side="right"), return_counts=True)
            for k, c in zip(ks.tolist(), counts.tolist(), strict=True):
                buckets[k] = buckets.get(k, 0) + c
    return Comparison(total, differing, max_ulp, max_abs, nans, buckets)


def digest(outputs: tuple[torch.Tensor, ...]) -> str:
    """A short hash of the outputs' bits, to count distinct results."""
    h = hashlib.blake2b(digest_size=8)
    for t in outputs:
        h.update(_bits(t).cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CheckResult:
    """The verdict of one check for one op x implementation x dtype, with its evidence.

    ``first_b``: the smallest batch size at which some row's bits differ from the same row
    computed alone (batch-variance). ``variants``: distinct results of
    batch row 0 over the sweep. ``per``: one entry per batch size / thread count / ISA.
    """

    check: str
    verdict: str = "pass"
    compared: int = 0
    differing: int = 0
    max_ulp: int | None = None
    max_abs: float | None = None
    nan_mismatches: int = 0
    first_b: int | None = None
    variants: int | None = None
    buckets: dict[int, int] = field(default_factory=dict)
    per: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown check {self.check!r}; expected one of {CHECKS}")
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {VERDICTS}")

    def add(self, c: Comparison, **where: Any) -> None:
        """Fold one comparison in; ``where`` (e.g. b=4) labels it in ``per``."""
        self.compared += c.compared
        self.differing += c.differing
        self.nan_mismatches += c.nan_mismatches
        if c.max_ulp is not None:
            self.max_ulp = max(self.max_ulp or 0, c.max_ulp)
        if c.max_abs is not None:
            self.max_abs = max(self.max_abs or 0.0, c.max_abs)
        for k, n in c.buckets.items():
            self.buckets[k] = self.buckets.get(k, 0) + n
        if where:
            self.per.append({**where, "differing": c.differing, "compared": c.compared, "max_ulp": c.max_ulp})
        if c.differing and self.verdict == "pass":
            self.verdict = "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "compared": self.compared,
            "differing": self.differing,
            "max_ulp": self.max_ulp,
            "max_abs": self.max_abs,
            "nan_mismatches": self.nan_mismatches,
            "first_b": self.first_b,
            "variants": self.variants,
            "ulp_hist": [[k, n] for k, n in sorted(self.buckets.items())],
            "per": self.per,
            "note": self.note,
        }


# --- attention-specific calls (user code as a model would write it) --------------------

PAD = 7  # left-padding tokens in the padding check
DECODE_STEPS = 4  # the last positions checked by decode-vs-prefill


def attention_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: np.random.Generator) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """(unpadded, padded-then-cropped) causal attention with explicit boolean masks.

    Both sides use a bool mask so the only difference is the padding. Pad positions hold
    random values (not zeros) so that a leak of a masked key would show; pad queries
    attend to themselves only, so no row is fully masked.
    """
    b, h, length, d = q.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    junk = [torch.from_numpy(g.standard_normal((b, h, PAD, d), dtype=np.float32)).to(q.dtype).to(q.device)
            for _ in range(3)]
    qp, kp, vp = (torch.cat([j, t], dim=2) for j, t in zip(junk, (q, k, v), strict=True))
    mask = torch.zeros(PAD + length, PAD + length, dtype=torch.bool, device=q.device)
    mask[PAD:, PAD:] = causal
    mask[:PAD, :PAD] = torch.eye(PAD, dtype=torch.bool, device=q.device)
    padded = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return plain, padded[:, :, PAD:].contiguous()


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefill: torch.Tensor
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each of the last positions t: (t, prefill row t, decode of token t over keys 0..t)."""
    length = q.shape[2]
    out = []
    for t in range(max(0, length - DECODE_STEPS), length):
        step = F.scaled_dot_product_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        out.append((t, prefill[:, :, t : t + 1].contiguous(), step))
    return out
