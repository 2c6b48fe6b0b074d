"""Names shared by the audit's runner and its renderers (kept free of torch imports, so
that ``detkit report`` re-renders a saved report without loading torch)."""

from __future__ import annotations

CHECKS = (
    "run-to-run",
    "batch-variance",
    "batch-position",
    "thread-variance",
    "padding",
    "decode-prefill",
    "isa-variance",
)

CHECK_HELP = {
    "run-to-run": "the same call repeated --runs times gives the same bits",
    "batch-variance": "every row of f(x[:b]) equals the same row computed alone (b=1), at every b of the sweep",
    "batch-position": "f(x[perm]) == f(x)[perm]: a row's bits do not depend on where it sits in the batch",
    "thread-variance": "1 thread gives the same bits as all threads (CPU), at every b of the sweep",
    "padding": "attention over a left-padded, masked sequence equals attention without the padding",
    "decode-prefill": "attention of one decoded token equals the same row of the causal prefill",
    "isa-variance": ("the same bits under other ATEN_CPU_CAPABILITY values (CPU, --isa), with numba, oneDNN and "
                     "MKL (which run torch's matmuls) capped to the same instruction set; for detkit's kernels, "
                     "whose BLAS tiles verify themselves at first use, oneDNN and MKL keep this CPU's"),
}

VERDICTS = ("pass", "fail", "error", "skipped", "n/a")

IMPLS = ("torch", "deterministic", "detkit", "portable")

IMPL_HELP = {
    "torch": "torch's own kernels",
    "deterministic": "torch under torch.use_deterministic_algorithms(True)",
    "detkit": "under detkit.batch_invariant()",
    "portable": "under detkit.batch_invariant(portable=True)",
}

CELL_LEGEND = ("ok: bitwise identical; FAIL b>=N: a row first changes at batch size N; "
               "FAIL P%: share of elements that differ; .: not applicable")


def ulp_bucket_label(k: int) -> str:
    """Label of ULP bucket ``k`` (distances in [2**(k-1), 2**k)): "1", "2-3", ..., "2^20-2^21"."""
    if k <= 1:
        return str(k)
    if k <= 11:
        return f"{1 << (k - 1)}-{(1 << k) - 1}"
    return f"2^{k - 1}-2^{k}"
