"""Subprocess of ``detkit audit --isa``: compute the suite at one ATEN_CPU_CAPABILITY.

The parent sets ``ATEN_CPU_CAPABILITY`` and ``NUMBA_CPU_NAME`` (and, but for detkit's own
kernels, ``ONEDNN_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS``) in this process's
environment, which torch, numba, oneDNN and MKL read once at start-up; that is why this
runs in a fresh interpreter. Usage: ``python -m detkit.audit.isa_worker DIR SPEC`` where
``DIR/SPEC`` (JSON) holds the ops, implementations, dtypes, batch size, seed and hidden
size. For each op x implementation x dtype it writes ``DIR/<op>.<impl>.<dtype>.pt`` (the
outputs) or ``.err`` (the error); ``DIR/capability.txt`` (the capability torch actually
used); and per implementation ``DIR/environment.<impl>.json`` (those variables as this
process saw them). It prints one line per result as it starts it, which the parent shows
as progress.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from detkit.audit import impls
from detkit.audit.catalogue import FLOAT_DTYPES, build_inputs, resolve_ops
from detkit.audit.runner import ISA_VARIABLES


def main(folder: Path, spec_name: str) -> int:
    spec = json.loads((folder / spec_name).read_text())
    (folder / "capability.txt").write_text(torch.backends.cpu.get_cpu_capability())
    seen = json.dumps({k: os.environ.get(k) for k in ISA_VARIABLES})
    for impl in spec["impls"]:
        (folder / f"environment.{impl}.json").write_text(seen)
    ops = resolve_ops(spec["ops"])
    total = len(spec["dtypes"]) * len(ops) * len(spec["impls"])
    done = 0
    for dtype in spec["dtypes"]:
        for op in ops:
            inputs = build_inputs(op, spec["batch"], FLOAT_DTYPES[dtype], spec["seed"], spec["hidden"])
            for impl in spec["impls"]:
                stem = f"{op.name}.{impl}.{dtype}"
                done += 1
                print(f"{op.name} {dtype} {impl} ({done}/{total})", flush=True)  # the parent's progress
                try:
                    with impls.context(impl):
                        outputs = op.run(inputs)
                    torch.save([o.contiguous() for o in outputs], folder / f"{stem}.pt")
                except Exception as exc:  # recorded for the parent, which reports it
                    (folder / f"{stem}.err").write_text(f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m detkit.audit.isa_worker DIR SPEC", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
