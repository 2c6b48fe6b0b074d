"""What a compiled CUDA kernel uses: ptxas's own report, and the facts a CUBIN holds.

The loader assembles every CUBIN with ``ptxas -v`` (``--ptxas-options=-v``: a report,
not a code change) and keeps the report beside the CUBIN. :func:`parse_ptxas_report`
turns it into one :class:`KernelResources` per entry point: registers per thread, the
local-memory stack frame, spill stores and loads, static shared memory. A spill is local
memory traffic in the kernel's loop, so the compile check reports it without a GPU.

:func:`cubin_entries` and :func:`cubin_symbol` read the CUBIN itself (an ELF64 file):
the kernels it can launch and the bytes of a ``__device__`` constant.
"""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass
from typing import Any

from detkit.errors import CompileError


@dataclass(frozen=True)
class KernelResources:
    """ptxas's report for one entry point (per thread, except shared memory per CTA)."""

    entry: str
    registers: int
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    shared_bytes: int = 0  # static __shared__ only; the launcher adds dynamic shared memory
    barriers: int = 0

    def __post_init__(self) -> None:
        if not self.entry:
            raise ValueError("entry must name a kernel")
        for name in ("registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "shared_bytes",
                     "barriers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")

    @property
    def spills(self) -> bool:
        """Whether registers overflow to local memory."""
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_ENTRY_LINE = re.compile(r"Compiling entry function '([^']+)'")
_FRAME_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_LINE = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
# ptxas's notes that cost speed without failing the build, e.g. wgmma serialised (C7515).
_PERFORMANCE_NOTE = re.compile(r"warning|Performance Loss", re.IGNORECASE)


def parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    """One :class:`KernelResources` per entry point of a ``ptxas -v`` report.

    Raises ``CompileError`` when an entry point's block lacks the lines every ptxas since
    CUDA 5 prints, so a changed format is noticed instead of read as zeros."""
    out: dict[str, KernelResources] = {}
    entry: str | None = None
    frame: tuple[int, int, int] | None = None
    for line in log.splitlines():
        if m := _ENTRY_LINE.search(line):
            entry, frame = m.group(1), None
        elif entry is not None and (m := _FRAME_LINE.search(line)):
            frame = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        elif entry is not None and (m := _USED_LINE.search(line)):
            if frame is None:
                raise CompileError(f"ptxas report: no stack-frame line for {entry} before {line.strip()!r}")
            barriers, smem = _BARRIERS.search(line), _SMEM.search(line)
            out[entry] = KernelResources(
                entry, int(m.group(1)), *frame,
                shared_bytes=int(smem.group(1)) if smem else 0,
                barriers=int(barriers.group(1)) if barriers else 0,
            )
            entry = None
    if entry is not None:
        raise CompileError(f"ptxas report: no register line for {entry}")
    return out


def ptxas_notes(log: str) -> tuple[str, ...]:
    """ptxas's warnings and performance notes (spills, serialised wgmma, ...), one per line."""
    return tuple(line.strip() for line in log.splitlines() if _PERFORMANCE_NOTE.search(line))


# --------------------------------------------------------------------------- ELF


_STT_FUNC, _STB_GLOBAL = 2, 1
_STO_CUDA_ENTRY = 0x10  # st_other bit of a __global__ function (a kernel one can launch)
_SHT_SYMTAB = 2


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int


def _elf(cubin: bytes) -> tuple[list[_Section], list[tuple[str, int, int, int, int]]]:
    """(sections, symbols as (name, info, other, section index, value))."""
    if len(cubin) < 64 or cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise CompileError("not a CUBIN: expected a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def string(table: tuple[int, ...], offset: int) -> str:
        start = table[4] + offset
        return cubin[start:cubin.index(b"\0", start)].decode()

    sections = [_Section(string(raw[shstrndx], r[0]), r[1], r[4], r[5], r[6]) for r in raw]
    symbols = []
    for sec in sections:
        if sec.type != _SHT_SYMTAB:
            continue
        for k in range(sec.size // 24):
            name, info, other, shndx, value, _size = struct.unpack_from("<IBBHQQ", cubin, sec.offset + 24 * k)
            symbols.append((string(raw[sec.link], name), info, other, shndx, value))
    return sections, symbols


def cubin_entries(cubin: bytes) -> tuple[str, ...]:
    """The kernels (``__global__`` functions) of a CUBIN, in symbol-table order."""
    _, symbols = _elf(cubin)
    return tuple(name for name, info, other, _, _ in symbols
                 if info >> 4 == _STB_GLOBAL and info & 0xF == _STT_FUNC and other & _STO_CUDA_ENTRY)


def cubin_symbol(cubin: bytes, name: str, size: int) -> bytes:
    """The first ``size`` bytes of the initialised ``__device__`` variable ``name``."""
    sections, symbols = _elf(cubin)
    for sym, _info, _other, shndx, value in symbols:
        if sym == name and 0 < shndx < len(sections):
            sec = sections[shndx]
            if value + size > sec.size:
                break
            return cubin[sec.offset + value:sec.offset + value + size]
    raise KeyError(f"{name} is not an initialised variable of this CUBIN")
