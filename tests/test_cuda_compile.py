"""Every CUDA kernel compiles for sm_80 and sm_90, without a GPU (runs in CI).

The compiler is NVRTC (``nvidia-cuda-nvrtc-cu12``, part of the ``test`` extra) or nvcc.
If neither is found these tests FAIL with instructions instead of skipping, so that CI
cannot go green without compiling the kernels; set ``DETKIT_SKIP_CUDA_COMPILE=1`` to skip
them on purpose.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import json
import os
import re
import shutil
import threading
import types
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COMPILE_ARCHS as ARCHS
from conftest import PTX_CHECKED_FILES
from typer.testing import CliRunner

from detkit.errors import BackendUnavailable, CompileError, InputError
from detkit.kernels import cuda as cuda_backend
from detkit.kernels import cuda_loader
from detkit.kernels.cuda_resources import (
    KernelResources,
    cubin_entries,
    cubin_symbol,
    parse_ptxas_report,
    ptxas_notes,
)

# (target, file) of every compilation check_all(ARCHS) does: matmul_sm90.cu only for sm_90, as sm_90a.
JOBS = [(t, n) for a in ARCHS for n in cuda_loader.KERNEL_FILES if (t := cuda_loader.build_arch(n, a)) is not None]


@pytest.fixture(scope="module")
def compiler(cuda_compiler: str) -> str:
    return cuda_compiler


@pytest.fixture(scope="module")
def results(compiled_kernels: dict) -> dict[tuple[str, str], cuda_loader.CheckResult]:
    return compiled_kernels


@pytest.mark.parametrize(("arch", "name"), JOBS)
def test_kernel_compiles(results: dict, arch: str, name: str) -> None:
    r = results[(arch, name)]
    assert r.ok, f"{name} does not compile for {arch} with {r.compiler}:\n{r.log}"


def _expected_entries() -> set[str]:
    """Every entry point the Python backend launches (must exist in the compiled PTX)."""
    sfx = ("f32", "bf16", "f16")
    names = {f"{op}_{g}_{s}" for op in ("softmax", "rms_norm", "layer_norm", "row_sum") for g in "pb" for s in sfx}
    names |= {f"elementwise_p_{s}" for s in sfx} | {f"row_cumsum_{s}" for s in sfx} | {f"attention_{s}" for s in sfx}
    names |= {f"pow_p_{s}" for s in sfx}
    names |= {f"solve_lower_{s}" for s in sfx}
    names |= {f"attention_{part}_{s}" for part in ("split", "combine") for s in sfx} | {"attention_anchor"}
    names |= {f"attention_tc_{s}_d{d}" for s in ("bf16", "f16") for d in cuda_backend._ATC_DIMS}
    return names


def _matmul_entries(configs: object) -> dict[str, set[str]]:
    """{module: entry points} of matmul tile configurations."""
    out: dict[str, set[str]] = {}
    for cfg in configs:  # type: ignore[attr-defined]
        out.setdefault(cfg.module, set()).update({f"{cfg.kernel}_kmajor", f"{cfg.kernel}_nmajor"})
    return out


def test_backend_entry_points_exist(results: dict) -> None:
    tables = [*cuda_backend.MATMUL_TILES.values(), *cuda_backend.PORTABLE_MATMUL_TILES.values()]
    catalogue = [c for cs in (*cuda_backend.TILE_CATALOGUE.values(), *cuda_backend.PORTABLE_TILE_CATALOGUE.values())
                 for c in cs]
    for arch in ARCHS:
        compiled = {e for (a, _), r in results.items() if a == arch for e in r.entries}
        missing = _expected_entries() - compiled
        assert not missing, f"entry points launched by detkit.kernels.cuda but not compiled for {arch}: {missing}"
        for module, entries in _matmul_entries([*tables, *catalogue]).items():
            target = cuda_loader.build_arch(module, arch)
            if target is None:
                continue
            missing = entries - set(results[(target, module)].entries)
            assert not missing, f"matmul configurations missing from {module} for {arch}: {sorted(missing)}"
        # the grouped (MoE) launches use the tables' configurations only
        grouped = {f"{c.kernel}_grouped_{layout}" for c in tables for layout in ("kmajor", "nmajor")}
        missing = grouped - set(results[(arch, "matmul.cu")].entries)
        assert not missing, f"grouped matmul entry points missing from matmul.cu for {arch}: {sorted(missing)}"
    # the default configurations are in matmul.cu itself, so that detkit never compiles the alternatives
    assert {c.module for c in tables} == {"matmul.cu"}
    for cfg in tables:
        assert any(c.kernel == cfg.kernel for cs in (*cuda_backend.TILE_CATALOGUE.values(),
                                                    *cuda_backend.PORTABLE_TILE_CATALOGUE.values()) for c in cs)


def test_wgmma_unit_is_built_only_for_sm_90a(compiler: str) -> None:
    """matmul_sm90.cu is compiled for sm_90a on sm_90 GPUs and for nothing else; compiled
    for plain sm_90 it stops with an error that says so (wgmma is not in sm_90)."""
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_90") == "sm_90a"
    # asked for by its own name (kernels check --arch sm_90a), it is built, not left out
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_90a") == "sm_90a"
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_80") is None
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_100") is None
    assert cuda_loader.build_arch("matmul.cu", "sm_80") == "sm_80"
    with pytest.raises(CompileError, match="compile it for sm_90a"):
        cuda_loader.compile_source(cuda_loader.kernel_source("matmul_sm90.cu"), "matmul_sm90.cu", "sm_90",
                                   output="ptx", compiler=compiler)


def test_wgmma_kernels_assemble(compiler: str) -> None:
    """PTX compilation only parses inline assembly; ptxas checks each wgmma instruction's
    shape, operand count and types, so check_all assembles every unit to a CUBIN (this
    one, from the cache), which holds every configuration's entry points."""
    cubin = cuda_loader.compile_source(cuda_loader.kernel_source("matmul_sm90.cu"), "matmul_sm90.cu", "sm_90a",
                                       output="cubin", compiler=compiler)
    assert cubin[:4] == b"\x7fELF"
    want = {f"{c.kernel}_{layout}" for dt in (torch.bfloat16, torch.float16)
            for c in cuda_backend.TILE_CATALOGUE[dt] if c.family == "wgmma" for layout in ("kmajor", "nmajor")}
    assert want and want <= set(cubin_entries(cubin)), sorted(want - set(cubin_entries(cubin)))


# Entry points that ptxas is allowed to spill, with a bound on the bytes per thread, and
# why. Anything else that spills fails test_kernels_do_not_spill_registers: look at the
# report (`detkit kernels check --resources`) before allowing it here.
KNOWN_SPILLS = {
    # ptxas keeps 32 registers (full occupancy at 256 threads) and stores one value of the
    # 16-bit output loop; a 4-byte, L1-resident spill in a memory-bound kernel (bfloat16
    # since the sum is anchored: 38 registers and no spill before).
    "softmax_b_f16": 16,
    "softmax_b_bf16": 16,
    # a catalogue alternative (not in the tables): ptxas holds it to 80 registers for
    # three CTAs per SM and spills part of the n-contiguous load addresses.
    "mm_simt_64x64x16_4x4_f32_nmajor": 32,
}


@pytest.mark.parametrize(("arch", "name"), JOBS)
def test_kernels_do_not_spill_registers(results: dict, arch: str, name: str) -> None:
    """ptxas's report covers every entry point, within the hardware's 255 registers, and
    no kernel spills registers to local memory beyond KNOWN_SPILLS; the tables' default
    kernels (matmul.cu, attention.cu) spill nothing at all."""
    r = results[(arch, name)]
    assert r.ok, r.log
    assert {x.entry for x in r.resources} == set(r.entries) and r.entries
    assert all(0 < x.registers <= 255 for x in r.resources)
    over = [(x.entry, x.registers, x.spill_store_bytes, x.spill_load_bytes) for x in r.spilling
            if max(x.spill_store_bytes, x.spill_load_bytes) > KNOWN_SPILLS.get(x.entry, 0)]
    assert not over, (f"{name} ({arch}) spills registers to local memory: (entry, registers, spill store / load "
                      f"bytes) {over}; reduce the live registers, or document the spill in KNOWN_SPILLS")
    if name in ("matmul.cu", "attention.cu"):
        assert not r.spilling, r.spilling


def test_ptxas_report_of_a_real_compile(compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers, spills, stack frame and static shared memory as ptxas reports them, for
    kernels built to show each; the entry points read from the CUBIN are the PTX's."""
    import struct

    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    src = cuda_loader.translation_unit(
        # 64 values live at once (each needs the previous one, all are used in reverse),
        # but at most 32 registers: two CTAs of 1024 threads per SM.
        'extern "C" __global__ void __launch_bounds__(1024, 2) tight(const float* x, float* y, int n) {\n'
        "    float v[64];\n    v[0] = x[threadIdx.x];\n"
        "#pragma unroll\n    for (int i = 1; i < 64; ++i) v[i] = __fmul_rn(v[i - 1], x[threadIdx.x + i * n]);\n"
        "    float s = 0.0f;\n"
        "#pragma unroll\n    for (int i = 63; i >= 0; --i) s = __fadd_rn(__fmul_rn(s, v[i]), v[i]);\n"
        "    y[threadIdx.x] = s;\n}\n"
        'extern "C" __global__ void shared(const float* x, float* y) {\n'
        "    __shared__ float t[300];\n    t[threadIdx.x] = x[threadIdx.x];\n    __syncthreads();\n"
        "    y[threadIdx.x] = t[299 - threadIdx.x];\n}\n"
        'extern "C" __device__ const int answer = 42;\n',
        "/src/r.cu",
    )
    cubin = cuda_loader.compile_source(src, "r.cu", "sm_80", compiler=compiler)
    report = parse_ptxas_report(cuda_loader.ptxas_report(src, "r.cu", "sm_80", compiler=compiler))
    ptx = cuda_loader.compile_source(src, "r.cu", "sm_80", output="ptx", compiler=compiler).decode()
    assert sorted(cubin_entries(cubin)) == sorted(re.findall(r"\.entry\s+(\w+)", ptx)) == ["shared", "tight"]
    tight, shared = report["tight"], report["shared"]
    assert tight.registers <= 32 and tight.stack_bytes > 0
    assert tight.spill_store_bytes > 0 and tight.spill_load_bytes > 0
    assert not shared.spills and shared.stack_bytes == 0 and shared.shared_bytes == 1200 and shared.barriers == 1
    assert tight.shared_bytes == 0 and tight.barriers == 0
    assert struct.unpack("<i", cubin_symbol(cubin, "answer", 4)) == (42,)
    with pytest.raises(KeyError, match="nowhere"):
        cubin_symbol(cubin, "nowhere", 4)
    # the report is kept with the CUBIN: a second process reads both from the disk cache
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    monkeypatch.setattr(cuda_loader, "_nvrtc", None)  # compiling now would fail loudly
    monkeypatch.setattr(cuda_loader, "_compile_nvcc", None)
    assert parse_ptxas_report(cuda_loader.ptxas_report(src, "r.cu", "sm_80", compiler=compiler)) == report


def test_a_compiler_without_the_report_option_still_builds(compiler: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An NVRTC that rejects --ptxas-options still compiles every kernel; the check says
    the report is missing instead of failing (a GPU run must not be lost to it)."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    real_nvcc, real_nvrtc = cuda_loader._compile_nvcc, cuda_loader._nvrtc

    def refuse(options: list[str]) -> None:
        if cuda_loader.PTXAS_REPORT_OPTION in options:
            raise CompileError("CUDA compilation failed (NVRTC_ERROR_INVALID_OPTION (5)): unrecognized option")

    def nvcc(source: str, name: str, options: list[str], output: str) -> tuple[bytes, str, bytes | None]:
        refuse(options)
        return real_nvcc(source, name, options, output)

    class Nvrtc:
        def compile(self, source: str, name: str, options: list[str], output: str) -> tuple[bytes, str, bytes | None]:
            refuse(options)
            return real_nvrtc().compile(source, name, options, output)

        def __getattr__(self, name: str) -> object:  # version, kind: the compiler's description
            return getattr(real_nvrtc(), name)

    monkeypatch.setattr(cuda_loader, "_compile_nvcc", nvcc)
    monkeypatch.setattr(cuda_loader, "_nvrtc", Nvrtc)
    (r,) = cuda_loader.check_all(("sm_80",), compiler=compiler, files=("attention.cu",))
    assert r.ok and "attention_anchor" in r.entries and r.resources == ()
    assert r.notes and "no ptxas report" in r.notes[0] and cuda_loader.PTXAS_REPORT_OPTION in r.notes[0]


def test_ptxas_report_parsing_rejects_what_it_cannot_read() -> None:
    good = ("ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
            "ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 128 bytes smem\n")
    (k,) = parse_ptxas_report(good).values()
    assert (k.entry, k.registers, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes, k.shared_bytes,
            k.barriers) == ("k", 40, 8, 4, 4, 128, 1) and k.spills
    with pytest.raises(CompileError, match="no stack-frame line for k"):
        parse_ptxas_report("\n".join(line for line in good.splitlines() if "stack frame" not in line))
    with pytest.raises(CompileError, match="no register line for k"):
        parse_ptxas_report(good.rsplit("ptxas info", 1)[0])
    with pytest.raises(ValueError, match="registers must be a non-negative int"):
        KernelResources("k", -1)
    with pytest.raises(CompileError, match="not a CUBIN"):
        cubin_entries(b"PTX text")
    assert ptxas_notes("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
                       "serialized\nptxas info    : Used 40 registers") == (
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized",)


# Float instructions that are not correctly rounded, flush subnormals, or use TF32.
_INEXACT = re.compile(r"\b[a-z0-9]+(?:\.[a-z0-9]+)*\.(?:approx|ftz)(?:\.[a-z0-9]+)*\b|\btf32\b")
# The one inexact instruction allowed, and where: CUDA's expf (ex2.approx.ftz on a reduced
# argument, within 2 ulp) in the batch-invariant softmax and the split attention kernels. It gives the
# same bits for the same input on one GPU, which is all portable=False promises; the
# portable kernels, which promise the same bits on every GPU, use none.
_EXPF_ENTRIES = re.compile(r"^(?:(?:softmax_b|attention_split|attention_combine)_(?:f32|bf16|f16)"
                           r"|attention_tc_(?:bf16|f16)_d\d+)$")


def _ptx_by_entry(ptx: str) -> dict[str, str]:
    parts = re.split(r"^(?=(?:\.visible\s+)?\.entry\s)", ptx, flags=re.M)
    return {m.group(1): part for part in parts if (m := re.match(r"(?:\.visible\s+)?\.entry\s+(\w+)", part))}


@pytest.mark.parametrize("name", PTX_CHECKED_FILES)
def test_kernels_use_no_approximate_flush_to_zero_or_tf32_instructions(compiler: str, name: str) -> None:
    """The compiled instructions keep the promises the options make: in every kernel of
    the default tables, no approximate (ex2.approx, rcp.approx, ...) or flush-to-zero
    float instruction and no TF32, except CUDA's expf where _EXPF_ENTRIES allows it."""
    ptx = cuda_loader.compile_source(cuda_loader.kernel_source(name), name, "sm_80", output="ptx",
                                     compiler=compiler).decode()
    entries = _ptx_by_entry(ptx)
    assert sorted(entries) == sorted(cubin_entries(cuda_loader.compile_source(
        cuda_loader.kernel_source(name), name, "sm_80", compiler=compiler)))
    found = {entry: sorted(set(_INEXACT.findall(body))) for entry, body in entries.items()}
    bad = {e: ops for e, ops in found.items() if ops and not (_EXPF_ENTRIES.match(e) and ops == ["ex2.approx.ftz.f32"])}
    assert not bad, f"inexact float instructions in {name}: {bad}"
    if name == "rowops.cu":  # the exception is where it is said to be, so this test can see one
        assert found["softmax_b_f32"] == ["ex2.approx.ftz.f32"] and not found["softmax_p_f32"]


def test_no_ptxas_warnings_or_performance_notes(results: dict) -> None:
    """ptxas compiles every unit without a warning, e.g. wgmma serialised (C7515), which
    would keep the Hopper family far from cuBLAS without failing anything."""
    noted = {(a, f): r.notes for (a, f), r in results.items() if r.notes}
    assert not noted, noted


def test_broken_kernel_error_points_at_its_line(compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A syntax error in a .cu file is reported at that file and line (the #line directive)."""
    broken = tmp_path / "kernels"
    shutil.copytree(cuda_loader.kernel_dir(), broken)
    lines = (broken / "attention.cu").read_text().splitlines()
    bad_line = 40
    lines.insert(bad_line - 1, "this is not C++;")
    (broken / "attention.cu").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv(cuda_loader.ENV_KERNEL_DIR, str(broken))
    (r,) = cuda_loader.check_all(("sm_90",), compiler=compiler, files=("attention.cu",))
    assert not r.ok
    assert f"attention.cu({bad_line})" in r.log, r.log


def test_a_kernel_dir_the_user_names_is_used_or_refused_never_replaced(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a directory missing a file used to fall back to the packaged sources without a word
    copy = tmp_path / "kernels"
    shutil.copytree(cuda_loader.kernel_dir(), copy)
    monkeypatch.setenv(cuda_loader.ENV_KERNEL_DIR, str(copy))
    assert cuda_loader.kernel_dir() == copy.resolve()
    (copy / "rowops.cu").unlink()
    with pytest.raises(InputError, match=r"DETKIT_CUDA_KERNELS_DIR=.* lacks rowops.cu; point it at a cuda_kernels"):
        cuda_loader.kernel_dir()
    monkeypatch.setenv(cuda_loader.ENV_KERNEL_DIR, str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="lacks common.cuh, "):
        cuda_loader.kernel_dir()


def test_template_error_raises_compile_error_with_location(compiler: str) -> None:
    src = cuda_loader.translation_unit(
        "template <typename T>\n__device__ T twice(T x) { return x.missing; }\n"
        'extern "C" __global__ void k(float* p) { p[0] = twice(p[0]); }\n',
        "/src/broken.cu",
    )
    with pytest.raises(CompileError) as info:
        cuda_loader.compile_source(src, "broken.cu", "sm_90", output="ptx", compiler=compiler)
    msg = str(info.value)
    assert "broken.cu(2)" in msg and "--ftz=false" in msg, msg


def test_compile_outputs_are_cached_on_disk_and_failures_are_not(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process (here: an empty in-process cache) reads PTX and CUBIN from the disk
    cache instead of compiling; a damaged entry is compiled again; an error is not stored."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    src = cuda_loader.translation_unit('extern "C" __global__ void k(float* p) { p[0] += 1.0f; }\n', "/src/k.cu")
    outs = {o: cuda_loader.compile_source(src, "k.cu", "sm_80", output=o, compiler=compiler) for o in ("ptx", "cubin")}
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.iterdir()) == ["cubin.z", "ptx.z"]
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    calls: list[str] = []
    real_nvcc, real_nvrtc = cuda_loader._compile_nvcc, cuda_loader._nvrtc

    def counting_nvcc(*args: object) -> tuple[bytes, str, bytes | None]:
        calls.append("nvcc")
        return real_nvcc(*args)  # type: ignore[arg-type]

    class CountingNvrtc:
        def compile(self, *args: object) -> tuple[bytes, str, bytes | None]:
            calls.append("nvrtc")
            return real_nvrtc().compile(*args)  # type: ignore[arg-type]

        def __getattr__(self, name: str) -> object:  # version, kind: the compiler's description
            return getattr(real_nvrtc(), name)

    monkeypatch.setattr(cuda_loader, "_compile_nvcc", counting_nvcc)
    monkeypatch.setattr(cuda_loader, "_nvrtc", CountingNvrtc)
    for o, want in outs.items():
        assert cuda_loader.compile_source(src, "k.cu", "sm_80", output=o, compiler=compiler) == want
    assert calls == []
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    next(tmp_path.glob("*.ptx.z")).write_bytes(b"not zlib")
    next(tmp_path.glob("*.cubin.z")).write_bytes(zlib.compress(b"\xff" * 8))  # a report longer than the entry
    for o, want in outs.items():
        assert cuda_loader.compile_source(src, "k.cu", "sm_80", output=o, compiler=compiler) == want
    assert calls == [compiler, compiler]
    broken = cuda_loader.translation_unit('extern "C" __global__ void k(float* p) { p[0] = q; }\n', "/src/b.cu")
    with pytest.raises(CompileError):
        cuda_loader.compile_source(broken, "b.cu", "sm_80", output="ptx", compiler=compiler)
    assert not list(tmp_path.glob("b-*"))


def test_an_nvrtc_cubin_compilation_keeps_its_ptx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVRTC makes the PTX on the way to a CUBIN: the compilation stores it, and the PTX
    asked for next (the approximate-instruction check reads it) comes from the caches,
    equal to a PTX compilation's; nvcc's PTX was a temporary file, so it compiles again."""
    if "nvrtc" not in cuda_loader.available_compilers():
        pytest.skip("needs NVRTC")
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    src = cuda_loader.translation_unit('extern "C" __global__ void k(float* p) { p[0] = expf(p[0]); }\n', "/src/k.cu")
    cuda_loader.compile_source(src, "k.cu", "sm_80", compiler="nvrtc")
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.iterdir()) == ["cubin.z", "ptx.z"]
    calls: list[str] = []
    real = cuda_loader._run_compiler
    monkeypatch.setattr(cuda_loader, "_run_compiler", lambda *args: (calls.append(args[0]), real(*args))[1])
    ptx = cuda_loader.compile_source(src, "k.cu", "sm_80", output="ptx", compiler="nvrtc")
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    assert cuda_loader.compile_source(src, "k.cu", "sm_80", output="ptx", compiler="nvrtc") == ptx  # from disk
    assert calls == []
    assert ptx == cuda_loader._nvrtc().compile(src, "k.cu", cuda_loader._options("sm_80"), "ptx")[0]
    assert b".target sm_80" in ptx and b"ex2" in ptx
    # the PTX is the older entry: a cache pruned to one entry keeps the CUBIN just compiled
    monkeypatch.setenv(cuda_loader.ENV_CACHE_MAX_MB, "0")
    other = src.replace("expf", "logf")
    cuda_loader.compile_source(other, "k.cu", "sm_80", compiler="nvrtc")
    assert [p.name.split(".", 1)[1] for p in tmp_path.iterdir()] == ["cubin.z"]
    monkeypatch.delenv(cuda_loader.ENV_CACHE_MAX_MB)
    calls.clear()
    if cuda_loader.find_nvcc() is not None:
        cuda_loader.compile_source(src, "k.cu", "sm_80", compiler="nvcc")
        cuda_loader.compile_source(src, "k.cu", "sm_80", output="ptx", compiler="nvcc")
        assert calls == ["nvcc", "nvcc"]


def test_disk_cache_deletes_least_recently_used_outputs_past_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each source version and checkout location adds its own outputs: past the limit the
    least recently used go (a read counts as a use); other files and the newest stay."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    # ".cubin": a raw entry an older detkit wrote
    names = [f"u{i}-sm_90-{i:032x}.{('cubin.z', 'ptx.z', 'cubin')[i % 3]}" for i in range(6)]
    for age, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (1e9 + age, 1e9 + age))
    (tmp_path / "notes.txt").write_bytes(b"y" * 5000)
    assert cuda_loader.prune_cache(6000) == []
    assert cuda_loader.prune_cache(3500) == [tmp_path / n for n in names[:3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[3:], "notes.txt"])
    assert cuda_loader.prune_cache(0) == [tmp_path / n for n in names[3:5]]  # the newest stays
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[5], "notes.txt"])
    monkeypatch.setenv(cuda_loader.ENV_CACHE_MAX_MB, "lots")
    with pytest.raises(InputError, match="DETKIT_CUDA_CACHE_MAX_MB='lots' is not a number"):
        cuda_loader.cache_limit_bytes()
    monkeypatch.setenv(cuda_loader.ENV_CACHE_MAX_MB, "0.5")
    assert cuda_loader.cache_limit_bytes() == 1 << 19


def test_a_bad_cache_limit_fails_before_compiling_and_writes_nothing(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it was read only after the compile had been written to the cache: the first call
    # failed, and the next ones (disk hits) passed
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cuda_loader.ENV_CACHE_MAX_MB, "lots")
    calls: list[str] = []
    real = cuda_loader._run_compiler
    monkeypatch.setattr(cuda_loader, "_run_compiler", lambda *args: (calls.append(args[2]), real(*args))[1])
    src = cuda_loader.translation_unit('extern "C" __global__ void k(float* p) { p[0] += 7.0f; }\n', "/src/k.cu")
    for _ in range(2):
        with pytest.raises(InputError, match="DETKIT_CUDA_CACHE_MAX_MB='lots' is not a number"):
            cuda_loader.compile_source(src, "k.cu", "sm_80", output="ptx", compiler=compiler)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_compiling_prunes_the_cache_and_a_read_refreshes_an_entry(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cuda_loader.ENV_CACHE_MAX_MB, "0")
    src = [cuda_loader.translation_unit(f'extern "C" __global__ void k(float* p) {{ p[0] += {i}.0f; }}\n', "/src/k.cu")
           for i in range(2)]
    cuda_loader.compile_source(src[0], "k.cu", "sm_80", output="ptx", compiler=compiler)
    (first,) = tmp_path.iterdir()
    os.utime(first, (1e9, 1e9))
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    cuda_loader.compile_source(src[0], "k.cu", "sm_80", output="ptx", compiler=compiler)  # a disk hit
    assert first.stat().st_mtime > 1e9 + 1
    cuda_loader.compile_source(src[1], "k.cu", "sm_80", output="ptx", compiler=compiler)
    (second,) = tmp_path.iterdir()  # a limit of 0 keeps only the output just compiled
    assert second != first


def test_nvcc_compiles_too() -> None:
    if os.environ.get("DETKIT_SKIP_CUDA_COMPILE") == "1":
        pytest.skip("DETKIT_SKIP_CUDA_COMPILE=1")
    if cuda_loader.find_nvcc() is None:
        pytest.skip("nvcc not installed (NVRTC is checked above)")
    (r,) = cuda_loader.check_all(("sm_90",), compiler="nvcc", files=("attention.cu",))
    assert r.ok, r.log


def test_compile_options_are_recorded_and_exact() -> None:
    info = cuda_loader.recorded_compile_options()
    opts = info["options"]
    for required in ("--ftz=false", "--prec-div=true", "--prec-sqrt=true", "--fmad=false"):
        assert required in opts
    assert not any("fast_math" in o or o in ("--ftz=true", "-ftz=true") for o in opts)
    assert info["fast_math"] is False
    assert set(info["sources_sha256"]) == {"common.cuh", *cuda_loader.KERNEL_FILES}
    json.dumps(info)  # it goes into JSON reports


def test_kernel_sources_ship_inside_the_package() -> None:
    """detkit/cuda_kernels (the packaged location) holds the sources, as in a wheel."""
    packaged = importlib.resources.files("detkit") / "cuda_kernels"
    for name in ("common.cuh", *cuda_loader.KERNEL_FILES):
        assert (packaged / name).is_file(), f"{name} is not reachable as package data"
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"detkit.cuda_kernels" = ["*.cu", "*.cuh"]' in pyproject


def test_translation_unit_has_line_directives() -> None:
    tu = cuda_loader.kernel_source("rowops.cu")
    assert tu.startswith('#line 1 "') and 'common.cuh"' in tu.splitlines()[0]
    assert any(line.startswith("#line 1 ") and line.endswith('rowops.cu"') for line in tu.splitlines())


def test_matmul_cu_configurations_are_compiled_in_its_own_unit_only(results: dict) -> None:
    """matmul_tiles.cu and matmul_sm90.cu come after matmul.cu for its templates, with
    DETKIT_TEMPLATES_ONLY defined around it: matmul.cu's configurations are compiled once,
    in its own unit, and every file keeps its line numbers."""
    for arch in ARCHS:
        own = set(results[(arch, "matmul.cu")].entries)
        assert "mm_tc_128x64x32_2x2_s3_bf16_kmajor" in own and "mm_simt_128x64x16_8x4_f32_grouped_nmajor" in own
        for name in ("matmul_tiles.cu", "matmul_sm90.cu"):
            target = cuda_loader.build_arch(name, arch)
            if target is not None:
                entries = set(results[(target, name)].entries)
                assert entries and not own & entries, (arch, name, sorted(own & entries)[:5])
    lines = cuda_loader.kernel_source("matmul_tiles.cu").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#line 1 ") and line.endswith('/matmul.cu"'))
    end = next(i for i, line in enumerate(lines) if line.startswith("#line 1 ") and line.endswith('matmul_tiles.cu"'))
    assert lines[start - 1] == "#define DETKIT_TEMPLATES_ONLY" and lines[end - 1] == "#undef DETKIT_TEMPLATES_ONLY"
    own_lines = (cuda_loader.kernel_dir() / "matmul.cu").read_text().splitlines()
    assert lines[start + 1:start + 1 + len(own_lines)] == own_lines


def test_cli_check_json(results: dict) -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--json", *[f"--arch={a}" for a in ARCHS]])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["ok"] is True and [(r["arch"], r["file"]) for r in payload["results"]] == JOBS
    for r in payload["results"]:
        assert [x["entry"] for x in r["resources"]] == r["entries"] and r["notes"] == []
        assert all(x["registers"] > 0 and x["spill_store_bytes"] >= 0 for x in r["resources"])


def test_cli_check_lists_each_kernels_resources(results: dict) -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--arch=sm_80", "--resources"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    softmax = next(x for x in results[("sm_80", "rowops.cu")].resources if x.entry == "softmax_b_f32")
    row = next(line for line in out.output.splitlines() if " softmax_b_f32 " in line)
    assert [int(c) for c in row.replace("│", " ").split()[1:]] == [
        softmax.registers, softmax.stack_bytes, softmax.spill_store_bytes, softmax.spill_load_bytes,
        softmax.shared_bytes]
    assert "rowops.cu (sm_80)" in out.output and "as ptxas -v reports it" in out.output


def test_check_on_a_gpu_compiles_in_parallel_then_loads_from_the_disk_cache(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`detkit kernels check` on a GPU machine: every file built for the GPU's arch is
    compiled (CUBIN and ptxas's report into the disk cache) before it is loaded, so the
    load compiles nothing; files built for other architectures are left out; a compile
    error is reported, not raised. Loading is stood in for (no GPU here)."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cuda_loader.ENV_COMPILER, compiler)
    monkeypatch.setattr(cuda_loader, "_compiled", {})  # as in a fresh process
    loaded: list[tuple[str, int, int]] = []

    def load(name: str, device: int) -> object:
        cached = list(tmp_path.glob(f"{Path(name).stem}-*.cubin.z"))
        loaded.append((name, device, len(cached)))
        return object()

    monkeypatch.setattr(cuda_loader, "load_module", load)
    rows = cuda_loader.check_device(3, "sm_80", files=("attention.cu", "rowops.cu", "matmul_sm90.cu"))
    assert [(r.file, r.arch, r.ok) for r in rows] == [("attention.cu", "sm_80", True), ("rowops.cu", "sm_80", True)]
    assert loaded == [("attention.cu", 3, 1), ("rowops.cu", 3, 1)]  # each CUBIN on disk before its load
    assert "attention_anchor" in rows[0].entries and "loaded on cuda:3" in rows[0].compiler
    assert {r.entry for r in rows[1].resources} == set(rows[1].entries)
    broken = tmp_path / "kernels"
    shutil.copytree(cuda_loader.kernel_dir(), broken)
    (broken / "rowops.cu").write_text((broken / "rowops.cu").read_text() + "\nthis is not C++;\n")
    monkeypatch.setenv(cuda_loader.ENV_KERNEL_DIR, str(broken))
    (row,) = cuda_loader.check_device(3, "sm_80", files=("rowops.cu",))
    assert not row.ok and "rowops.cu(" in row.log and len(loaded) == 2


def test_cli_check_table_names_the_compiler(results: dict) -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--arch=sm_90"])
    assert out.exit_code == 0, out.output
    assert "compiler:" in out.output and "matmul.cu" in out.output


def test_cli_rejects_bad_arch(compiler: str) -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--arch", "sm_9"])
    assert isinstance(out.exception, InputError) and "sm_9" in str(out.exception)
    # well formed but unknown to the compiler: bad input (exit 2), not five failed checks
    out = CliRunner().invoke(app, ["kernels", "check", "--arch", "sm_99"])
    assert isinstance(out.exception, InputError) and "cannot compile for sm_99" in str(out.exception)
    # older than the kernels support: said so, not ptxas errors from five failed checks
    out = CliRunner().invoke(app, ["kernels", "check", "--arch", "sm_70"])
    assert isinstance(out.exception, InputError) and "need sm_80 or newer" in str(out.exception)


def test_backend_explains_why_it_is_unavailable() -> None:
    ok, reason = cuda_backend.available()
    if ok:
        pytest.skip("a usable GPU is present; tests/test_cuda_gpu.py covers it")
    assert reason and ("CuPy" in reason or "CUDA" in reason or "sm_" in reason)
    with pytest.raises(InputError, match="CUDA device"):
        cuda_backend.softmax(torch.zeros(2, 3), False)


def test_backend_is_unavailable_when_cupy_cannot_use_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CuPy wheel for a newer CUDA than the driver imports fine and fails at its first
    call: available() says so (the GPU tests skip with that reason) instead of every
    launch failing with CuPy's raw runtime error."""

    def no_driver() -> int:
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    runtime = types.SimpleNamespace(getDeviceCount=no_driver)
    fake_cupy = types.SimpleNamespace(__version__="13.6.0", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(cuda_backend, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    cuda_backend._availability.cache_clear()
    try:
        ok, reason = cuda_backend.available()
    finally:
        cuda_backend._availability.cache_clear()
    assert not ok and "cudaErrorInsufficientDriver" in reason and "cupy-cuda13x" in reason


def test_tile_tags_match_the_instantiations() -> None:
    """Each DETKIT_*_CONFIG line's numbers are the ones its tag (and so the host's grid
    and block sizes) encodes, and the Python catalogue lists exactly those lines."""
    d = cuda_loader.kernel_dir()
    files = ("matmul.cu", "matmul_tiles.cu", "matmul_sm90.cu")
    text = "".join((d / f).read_text() for f in files)
    tc = re.findall(r"^DETKIT_TC_CONFIG\((\w+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\)", text, re.M)
    simt = re.findall(r"^DETKIT_SIMT_CONFIG\((\w+), (\d+), (\d+), (\d+), (\d+), (\d+)\)", text, re.M)
    wg = re.findall(r"^DETKIT_WG_CONFIG\((\w+), (\d+), (\d+), (\d+)\)", text, re.M)
    assert [t[0] for t in tc] and [t[0] for t in simt] and [t[0] for t in wg]
    for tag, *nums in tc:
        assert tag == "{}x{}x{}_{}x{}_s{}".format(*nums), tag
    for tag, *nums in simt:
        assert tag == "{}x{}x{}_{}x{}".format(*nums), tag
    for tag, bm, bn, stages in wg:  # BK is 64: one 128-byte swizzle row of 16-bit values
        assert tag == f"{bm}x{bn}x64_s{stages}", tag
    assert sorted(t[0] for t in tc) == sorted(cuda_backend.TC_TAGS)
    assert sorted(t[0] for t in simt) == sorted(cuda_backend.SIMT_TAGS)
    assert sorted(t[0] for t in wg) == sorted(cuda_backend.WG_TAGS)
    families = {"tc": tc, "simt": simt, "wgmma": [(t, bm, bn, "64") for t, bm, bn, _ in wg]}
    for cfgs in cuda_backend.TILE_CATALOGUE.values():
        for cfg in cfgs:
            nums = next(n for t, *n in families[cfg.family] if t == cfg.name.removeprefix("wgmma_"))
            assert (cfg.bm, cfg.bn, cfg.bk) == tuple(int(x) for x in nums[:3]), cfg
    # each configuration is launched from the unit of the file that instantiates it
    for cfg in (c for cs in (*cuda_backend.TILE_CATALOGUE.values(), *cuda_backend.PORTABLE_TILE_CATALOGUE.values())
                for c in cs):
        tag = cfg.name.removeprefix("wgmma_")
        (home,) = [f for f in files if re.search(rf"^DETKIT_\w+_CONFIG\({tag},", (d / f).read_text(), re.M)]
        assert cfg.module == home, (cfg, home)


def _stand_in_cupy(monkeypatch: pytest.MonkeyPatch, launch: Callable[..., None],
                   attrs: list[tuple[int, int, int]] | None = None, current_device: int = 0) -> list[int]:
    """Route the launcher to stand-ins for CuPy, the loaded module and torch's stream (no
    GPU here): every entry point has the handle 1234 and cuLaunchKernel is ``launch``;
    funcSetAttribute calls go to ``attrs``. Returns the devices entered with cupy.cuda.Device."""
    import contextlib

    calls = [] if attrs is None else attrs
    entered: list[int] = []

    def device(index: int) -> contextlib.AbstractContextManager[None]:
        entered.append(index)
        return contextlib.nullcontext()

    driver = types.SimpleNamespace(funcSetAttribute=lambda f, a, v: calls.append((f, a, v)), launchKernel=launch)
    runtime = types.SimpleNamespace(getDevice=lambda: current_device)
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=device, driver=driver, runtime=runtime))
    monkeypatch.setattr(cuda_backend, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(cuda_backend, "_functions", {})
    monkeypatch.setattr(cuda_loader, "load_module",
                        lambda name, index: types.SimpleNamespace(function=lambda e: types.SimpleNamespace(ptr=1234)))
    monkeypatch.setattr(cuda_backend, "_stream_ptr", lambda index: 5000 + index)
    return entered


def test_a_failed_launch_names_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's own error path: a driver error becomes a KernelLaunchError naming
    the entry point and grid."""
    from detkit.errors import KernelLaunchError

    def launch(*args: object) -> None:
        raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested for launch")

    _stand_in_cupy(monkeypatch, launch)
    with pytest.raises(KernelLaunchError, match=r"mm_tc_x_kmajor \(matmul.cu\) on cuda:0 with grid \(2, 1, 1\)") as err:
        cuda_backend._launch(torch.device("cuda", 0), "matmul.cu", "mm_tc_x_kmajor", (2, 1, 1), 128, "", ())
    assert "OUT_OF_RESOURCES" in str(err.value) and "CUDA_LAUNCH_BLOCKING=1" in str(err.value)


_CTYPES = {"P": ctypes.c_uint64, "q": ctypes.c_int64, "i": ctypes.c_int32, "f": ctypes.c_float, "d": ctypes.c_double}


def _read_params(address: int, sizes: tuple[int, ...], sig: str) -> list[object]:
    """What a kernel reads from cuLaunchKernel's kernelParams: parameter i at the address
    in slot i of the pointer array, ``sizes[i]`` bytes of the C type ``sig[i]``."""
    pointers = (ctypes.c_void_p * len(sizes)).from_address(address)
    out = []
    for ptr, size, code in zip(pointers, sizes, sig, strict=True):
        assert ctypes.sizeof(_CTYPES[code]) == size
        out.append(_CTYPES[code].from_address(ptr).value)
    return out


def test_the_launcher_passes_each_argument_as_its_c_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuLaunchKernel gets the grid, block, shared memory, torch's stream and a kernelParams
    array from which every argument reads back as the C type its signature names (pointers
    as 64-bit, int and float as 4 bytes: a float rounded through float64, or an int
    written as 8 bytes, would give the kernel other values); each thread fills its own."""
    seen: list[tuple[object, ...]] = []
    sig = "PiqfdiP"

    def launch(f: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, smem: int, stream: int,
               params: int, extra: int) -> None:
        seen.append((f, (gx, gy, gz), (bx, by, bz), smem, stream, extra,
                     _read_params(params, cuda_backend._packer(sig).sizes, sig)))

    entered = _stand_in_cupy(monkeypatch, launch)
    args = (2**63 + 12345, -7, -(2**40) - 3, 1.1, 0.1, 2**31 - 1, 0)
    cuda_backend._launch(torch.device("cuda", 0), "rowops.cu", "softmax_b_f32", (3, 2, 1), 256, sig, args, 1024)
    assert seen == [(1234, (3, 2, 1), (256, 1, 1), 1024, 5000, 0,
                     [2**63 + 12345, -7, -(2**40) - 3, float(np.float32(1.1)), 0.1, 2**31 - 1, 0])]
    assert entered == [0]  # loading the module; the launch itself switches no device (cuda:0 is current)
    # another thread, other values, at the same time: its own kernelParams
    barrier = threading.Barrier(2)
    results: list[list[object]] = []

    def other() -> None:
        params, sizes = cuda_backend._kernel_params("if", (41, 2.5))
        barrier.wait()
        barrier.wait()
        results.append(_read_params(params, sizes, "if"))

    thread = threading.Thread(target=other)
    thread.start()
    barrier.wait()
    params, sizes = cuda_backend._kernel_params("if", (-1, -8.0))
    barrier.wait()
    thread.join()
    assert results == [[41, 2.5]] and _read_params(params, sizes, "if") == [-1, -8.0]


def test_the_launcher_refuses_arguments_that_do_not_fit_their_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value past its C type (an int beyond 32 bits for ``i``, a negative pointer) is an
    InputError naming the kernel, not a value cut to fit; a signature that does not match
    the arguments, or names no C type, is a launcher bug: ValueError. Nothing launches."""
    _stand_in_cupy(monkeypatch, lambda *a: pytest.fail("launched"))
    dev = torch.device("cuda", 0)
    for sig, bad in (("i", (2**31,)), ("P", (-1,)), ("f", (1e39,)), ("i", (0.5,))):
        with pytest.raises(InputError, match=r"e \(rowops.cu\): an argument does not fit its C type"):
            cuda_backend._launch(dev, "rowops.cu", "e", (1, 1, 1), 32, sig, bad)
    for sig, bad, what in (("ii", (1,), "has 2 parameters, got 1"), ("h", (2,), "are not parameter types"),
                           ("i" * 49, (0,) * 49, "at most 48 arguments")):
        with pytest.raises(ValueError, match=what):
            cuda_backend._launch(dev, "rowops.cu", "e", (1, 1, 1), 32, sig, bad)


def test_the_launcher_enters_the_tensors_device_only_when_another_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors on cuda:1 while cuda:0 is current: the launch runs in cuda:1's context
    (a module loaded there cannot launch in another), and the stream is cuda:1's."""
    streams: list[int] = []
    entered = _stand_in_cupy(monkeypatch, lambda *a: streams.append(a[8]), current_device=0)
    cuda_backend._launch(torch.device("cuda", 1), "rowops.cu", "e", (1, 1, 1), 32, "", ())
    assert streams == [5001] and entered == [1, 1]  # the load, then the launch


def test_the_launcher_asks_torch_for_its_stream_and_the_capability_cheaply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per launch, torch's raw current-stream binding where the build has it (else the
    public Stream object), and the compute capability asked once per device: on an H200
    these calls took more host time than a small row op's kernel. An sm_7x GPU is
    refused, and not remembered as usable."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    assert cuda_backend._stream_ptr(3) == 1003
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=7 + index))
    assert cuda_backend._stream_ptr(2) == 9
    asked: list[int] = []
    capability = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or capability[index])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    monkeypatch.setattr(cuda_backend, "_majors", {})
    assert [cuda_backend._major(torch.device("cuda", 0)) for _ in range(3)] == [9, 9, 9] and asked == [0]
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match=r"GPU 1 is sm_7x; detkit needs sm_80 or newer"):
            cuda_backend._major(torch.device("cuda", 1))
    assert asked == [0, 1, 1]


def test_tensor_core_shared_memory_sizes_match_the_kernels(compiler: str) -> None:
    """The dynamic shared memory the launcher passes (TileConfig.smem) is what each
    configuration's TcCfg / WgCfg::SMEM_BYTES says, read from the compiled CUBIN."""
    import struct

    cubins = {f: cuda_loader.compile_source(cuda_loader.kernel_source(f), f, arch, compiler=compiler)
              for f, arch in (("matmul.cu", "sm_90"), ("matmul_tiles.cu", "sm_90"), ("matmul_sm90.cu", "sm_90a"))}
    configs = [*cuda_backend.TILE_CATALOGUE[torch.bfloat16], *cuda_backend.TILE_CATALOGUE[torch.float16],
               *(c for c in cuda_backend.MATMUL_TILES.values() if c.tensor_cores)]
    for cfg in configs:
        wg = cfg.family == "wgmma"
        symbol = f"mm_wg_{cfg.name.removeprefix('wgmma_')}_smem_bytes" if wg else f"mm_tc_{cfg.name}_smem_bytes"
        cubin = cubins[cfg.module]
        (declared,) = struct.unpack("<i", cubin_symbol(cubin, symbol, 4))
        assert declared == cfg.smem, (cfg.name, declared, cfg.smem)
    # the tables' defaults stay within the 48 KiB every GPU grants without opting in
    assert all(c.smem <= 48 * 1024 for c in cuda_backend.MATMUL_TILES.values())
    assert sum(c.smem > 48 * 1024 for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16]) >= 3


def test_shared_memory_limit_is_asked_of_the_driver_when_torch_does_not_say(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.6 has no ``shared_memory_per_block_optin``: the limit then comes from the
    driver (through CuPy), not the 48 KiB default, which would leave every deep-pipeline
    and wgmma configuration out of the tests and benchmarks on an H100."""

    asked: list[tuple[int, int]] = []

    def attribute(attr: int, index: int) -> int:
        asked.append((attr, index))
        return 232448  # an H100's opt-in limit

    runtime = types.SimpleNamespace(deviceGetAttribute=attribute)
    monkeypatch.setattr(cuda_backend, "_cupy", lambda: types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(major=9, minor=0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    monkeypatch.setattr(cuda_backend, "_majors", {})
    dev = torch.device("cuda", 1)
    assert cuda_backend._smem_optin(dev) == 232448 and asked == [(97, 1)]
    big = max(cuda_backend.TILE_CATALOGUE[torch.bfloat16], key=lambda c: c.smem)
    assert big.smem > 48 * 1024 and cuda_backend.fits(big, dev)
    # torch >= 2.6 says it itself
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: types.SimpleNamespace(shared_memory_per_block_optin=101376))
    asked.clear()
    assert cuda_backend._smem_optin(dev) == 101376 and not asked


def test_launcher_opts_in_to_large_shared_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 48 KiB the launcher raises the kernel's dynamic shared memory limit (once per
    loaded function) and passes the size at every launch; below it, it sets nothing."""
    attrs: list[tuple[int, int, int]] = []
    launches: list[int] = []
    _stand_in_cupy(monkeypatch, lambda *a: launches.append(a[7]), attrs)
    dev = torch.device("cuda", 0)
    for _ in range(2):
        cuda_backend._launch(dev, "matmul_tiles.cu", "big", (1, 1, 1), 128, "", (), shared_mem=147456)
        cuda_backend._launch(dev, "matmul.cu", "small", (1, 1, 1), 128, "", (), shared_mem=46080)
    assert attrs == [(1234, 8, 147456)]  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert launches == [147456, 46080, 147456, 46080]


@pytest.mark.parametrize("how", ["option", "env"])
def test_cli_check_with_nvcc_asked_for_but_missing_is_an_environment_error(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, `--compiler nvcc` without nvcc died on an AssertionError (exit 1, which
    means "a kernel failed to compile"); it is a missing tool: one line, exit 2."""
    from detkit.cli import app

    monkeypatch.setattr(cuda_loader, "find_nvcc", lambda: None)
    cuda_loader._describe.cache_clear()  # an earlier test may have described a real nvcc
    if how == "env":
        monkeypatch.setenv(cuda_loader.ENV_COMPILER, "nvcc")
    args = ["kernels", "check", "--arch=sm_80"] + (["--compiler", "nvcc"] if how == "option" else [])
    out = CliRunner().invoke(app, args)
    # main() turns a DetkitError into one line on stderr and exit code 2
    assert isinstance(out.exception, BackendUnavailable), out.output
    assert "nvcc was asked for" in str(out.exception) and "--compiler nvrtc" in str(out.exception)
    if how == "env":  # the fingerprint records the missing compiler instead of an AssertionError
        info = cuda_loader.recorded_compile_options()
        assert info["compiler"] is None and "nvcc was asked for" in info["compiler_error"]


def test_check_on_a_gpu_reports_a_module_that_does_not_load_as_a_failed_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CUBIN the driver refuses (a toolkit newer than the driver, CuPy unable to use the
    GPU) is that file's failed row, with the driver's message, not a traceback that loses
    every other file's result and `detkit kernels check --json`'s output."""
    from detkit.cli import app

    def compiled(name: str, target: str, compiler: str | None, desc: str) -> cuda_loader.CheckResult:
        return cuda_loader.CheckResult(name, target, desc, True, 0.5, ("k",))

    def load(name: str, device: int) -> object:
        if name == "rowops.cu":
            raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the provided PTX was compiled with an "
                               "unsupported toolchain.")
        return object()

    monkeypatch.setattr(cuda_loader, "compiler_description", lambda compiler=None: "NVRTC 99.0")
    monkeypatch.setattr(cuda_loader, "_check_unit", compiled)
    monkeypatch.setattr(cuda_loader, "load_module", load)
    rows = cuda_loader.check_device(0, "sm_80", files=("attention.cu", "rowops.cu"))
    assert [(r.file, r.ok) for r in rows] == [("attention.cu", True), ("rowops.cu", False)]
    assert "loading rowops.cu (sm_80) on cuda:0 failed" in rows[1].log
    assert "UNSUPPORTED_PTX_VERSION" in rows[1].log
    monkeypatch.setattr("detkit.cli.kernels._local_gpu", lambda: (0, "sm_80"))
    out = CliRunner().invoke(app, ["kernels", "check", "--json"])
    assert out.exit_code == 1, out.output
    payload = json.loads(out.stdout)
    assert payload["ok"] is False and {r["file"]: r["ok"] for r in payload["results"]}["rowops.cu"] is False


def test_a_bad_compiler_variable_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """recorded_compile_options() (every report's fingerprint, cuda.status()) records why no
    compiler is known; a misspelt $DETKIT_CUDA_COMPILER made it raise, and the fingerprint
    lost the options and source hashes with it."""
    monkeypatch.setenv(cuda_loader.ENV_COMPILER, "clang")
    info = cuda_loader.recorded_compile_options()
    assert info["compiler"] is None and "'clang'" in info["compiler_error"]
    assert info["options"] == list(cuda_loader.COMPILE_OPTIONS) and info["sources_sha256"]
    assert cuda_backend.status()["compile"]["compiler"] is None
