"""Every CUDA kernel compiles for sm_80 and sm_90, without a GPU (runs in CI).

The compiler is NVRTC (``nvidia-cuda-nvrtc-cu12``, part of the ``test`` extra) or nvcc.
If neither is found these tests FAIL with instructions instead of skipping, so that CI
cannot go green without compiling the kernels; set ``DETKIT_SKIP_CUDA_COMPILE=1`` to skip
them on purpose.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from detkit.errors import CompileError, InputError
from detkit.kernels import cuda as cuda_backend
from detkit.kernels import cuda_loader

ARCHS = ("sm_80", "sm_90")
# (target, file) of every compilation check_all(ARCHS) does: matmul_sm90.cu only for sm_90, as sm_90a.
JOBS = [(t, n) for a in ARCHS for n in cuda_loader.KERNEL_FILES if (t := cuda_loader.build_arch(n, a)) is not None]


@pytest.fixture(scope="module")
def compiler() -> str:
    if os.environ.get("DETKIT_SKIP_CUDA_COMPILE") == "1":
        pytest.skip("DETKIT_SKIP_CUDA_COMPILE=1: CUDA compile checks skipped on purpose")
    found = cuda_loader.available_compilers()
    if not found:
        pytest.fail(
            "no CUDA compiler found, so the CUDA kernels cannot be compile-checked: install the test "
            "extra (`pip install -e '.[test]'` brings nvidia-cuda-nvrtc-cu12) or put nvcc on PATH; "
            "set DETKIT_SKIP_CUDA_COMPILE=1 to skip these tests deliberately."
        )
    return found[0]


@pytest.fixture(scope="module")
def results(compiler: str) -> dict[tuple[str, str], cuda_loader.CheckResult]:
    return {(r.arch, r.file): r for r in cuda_loader.check_all(ARCHS, compiler=compiler)}


@pytest.mark.parametrize(("arch", "name"), JOBS)
def test_kernel_compiles(results: dict, arch: str, name: str) -> None:
    r = results[(arch, name)]
    assert r.ok, f"{name} does not compile for {arch} with {r.compiler}:\n{r.log}"


def _expected_entries() -> set[str]:
    """Every entry point the Python backend launches (must exist in the compiled PTX)."""
    sfx = ("f32", "bf16", "f16")
    names = {f"{op}_{g}_{s}" for op in ("softmax", "rms_norm", "layer_norm", "row_sum") for g in "pb" for s in sfx}
    names |= {f"elementwise_p_{s}" for s in sfx} | {f"attention_{s}" for s in sfx}
    names |= {f"attention_{part}_{s}" for part in ("split", "combine") for s in sfx} | {"attention_anchor"}
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
    # the default configurations are in matmul.cu itself, so that detkit never compiles the alternatives
    assert {c.module for c in tables} == {"matmul.cu"}
    for cfg in tables:
        assert any(c.kernel == cfg.kernel for cs in (*cuda_backend.TILE_CATALOGUE.values(),
                                                    *cuda_backend.PORTABLE_TILE_CATALOGUE.values()) for c in cs)


def test_wgmma_unit_is_built_only_for_sm_90a(compiler: str) -> None:
    """matmul_sm90.cu is compiled for sm_90a on sm_90 GPUs and for nothing else; compiled
    for plain sm_90 it stops with an error that says so (wgmma is not in sm_90)."""
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_90") == "sm_90a"
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_80") is None
    assert cuda_loader.build_arch("matmul_sm90.cu", "sm_100") is None
    assert cuda_loader.build_arch("matmul.cu", "sm_80") == "sm_80"
    with pytest.raises(CompileError, match="compile it for sm_90a"):
        cuda_loader.compile_source(cuda_loader.kernel_source("matmul_sm90.cu"), "matmul_sm90.cu", "sm_90",
                                   output="ptx", compiler=compiler)


def test_wgmma_kernels_assemble(compiler: str) -> None:
    """PTX compilation only parses inline assembly; ptxas checks each wgmma instruction's
    shape, operand count and types, so check_all assembles matmul_sm90.cu to a CUBIN too
    (this one, from the cache), which holds every configuration's entry points."""
    import re

    cubin = cuda_loader.compile_source(cuda_loader.kernel_source("matmul_sm90.cu"), "matmul_sm90.cu", "sm_90a",
                                       output="cubin", compiler=compiler)
    assert cubin[:4] == b"\x7fELF"
    names = set(re.findall(rb"mm_wg_\w+_(?:bf16|f16)_(?:kmajor|nmajor)", cubin))
    want = {f"{c.kernel}_{layout}".encode() for dt in (torch.bfloat16, torch.float16)
            for c in cuda_backend.TILE_CATALOGUE[dt] if c.family == "wgmma" for layout in ("kmajor", "nmajor")}
    assert want and want <= names, sorted(want - names)


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
    assert sorted(p.name.split(".", 1)[1] for p in tmp_path.iterdir()) == ["cubin", "ptx.z"]
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    calls: list[str] = []
    real_nvcc, real_nvrtc = cuda_loader._compile_nvcc, cuda_loader._nvrtc

    def counting_nvcc(*args: object) -> bytes:
        calls.append("nvcc")
        return real_nvcc(*args)  # type: ignore[arg-type]

    class CountingNvrtc:
        def compile(self, *args: object) -> bytes:
            calls.append("nvrtc")
            return real_nvrtc().compile(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cuda_loader, "_compile_nvcc", counting_nvcc)
    monkeypatch.setattr(cuda_loader, "_nvrtc", CountingNvrtc)
    for o, want in outs.items():
        assert cuda_loader.compile_source(src, "k.cu", "sm_80", output=o, compiler=compiler) == want
    assert calls == []
    monkeypatch.setattr(cuda_loader, "_compiled", {})
    next(tmp_path.glob("*.ptx.z")).write_bytes(b"not zlib")
    assert cuda_loader.compile_source(src, "k.cu", "sm_80", output="ptx", compiler=compiler) == outs["ptx"]
    assert calls == [compiler]
    broken = cuda_loader.translation_unit('extern "C" __global__ void k(float* p) { p[0] = q; }\n', "/src/b.cu")
    with pytest.raises(CompileError):
        cuda_loader.compile_source(broken, "b.cu", "sm_80", output="ptx", compiler=compiler)
    assert not list(tmp_path.glob("b-*"))


def test_disk_cache_deletes_least_recently_used_outputs_past_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each source version and checkout location adds its own outputs: past the limit the
    least recently used go (a read counts as a use); other files and the newest stay."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    names = [f"u{i}-sm_90-{i:032x}.{'cubin' if i % 2 else 'ptx.z'}" for i in range(6)]
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


def test_cli_check_json(results: dict) -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--json", *[f"--arch={a}" for a in ARCHS]])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert payload["ok"] is True and [(r["arch"], r["file"]) for r in payload["results"]] == JOBS


def test_check_on_a_gpu_compiles_in_parallel_then_loads_from_the_disk_cache(
    compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`detkit kernels check` on a GPU machine: every file built for the GPU's arch is
    compiled (CUBIN into the disk cache, PTX for its entries) before it is loaded, so the
    load compiles nothing; files built for other architectures are left out; a compile
    error is reported, not raised. Loading is stood in for (no GPU here)."""
    monkeypatch.setenv(cuda_loader.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setenv(cuda_loader.ENV_COMPILER, compiler)
    loaded: list[tuple[str, int, int]] = []

    def load(name: str, device: int) -> object:
        cached = list(tmp_path.glob(f"{Path(name).stem}-*.cubin"))
        loaded.append((name, device, len(cached)))
        return object()

    monkeypatch.setattr(cuda_loader, "load_module", load)
    rows = cuda_loader.check_device(3, "sm_80", files=("attention.cu", "rowops.cu", "matmul_sm90.cu"))
    assert [(r.file, r.arch, r.ok) for r in rows] == [("attention.cu", "sm_80", True), ("rowops.cu", "sm_80", True)]
    assert loaded == [("attention.cu", 3, 1), ("rowops.cu", 3, 1)]  # each CUBIN on disk before its load
    assert "attention_anchor" in rows[0].entries and "loaded on cuda:3" in rows[0].compiler
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


def test_cli_rejects_bad_arch() -> None:
    from detkit.cli import app

    out = CliRunner().invoke(app, ["kernels", "check", "--arch", "sm_9"])
    assert isinstance(out.exception, InputError) and "sm_9" in str(out.exception)


def test_backend_explains_why_it_is_unavailable() -> None:
    ok, reason = cuda_backend.available()
    if ok:
        pytest.skip("a usable GPU is present; tests/test_cuda_gpu.py covers it")
    assert reason and ("CuPy" in reason or "CUDA" in reason or "sm_" in reason)
    with pytest.raises(InputError, match="CUDA device"):
        cuda_backend.softmax(torch.zeros(2, 3), False)


def test_tile_tags_match_the_instantiations() -> None:
    """Each DETKIT_*_CONFIG line's numbers are the ones its tag (and so the host's grid
    and block sizes) encodes, and the Python catalogue lists exactly those lines."""
    import re

    d = cuda_loader.kernel_dir()
    text = "".join((d / f).read_text() for f in ("matmul.cu", "matmul_tiles.cu", "matmul_sm90.cu"))
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


def _stand_in_cupy(monkeypatch: pytest.MonkeyPatch, function: object,
                   attrs: list[tuple[int, int, int]] | None = None) -> None:
    """Route the launcher to stand-ins for CuPy, the loaded module and torch's stream (no
    GPU here): every entry point is ``function``; funcSetAttribute calls go to ``attrs``."""
    import contextlib
    import types

    calls = [] if attrs is None else attrs
    driver = types.SimpleNamespace(funcSetAttribute=lambda f, a, v: calls.append((f, a, v)))
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        ExternalStream=lambda ptr, device: object(), Device=lambda index: contextlib.nullcontext(), driver=driver))
    monkeypatch.setattr(cuda_backend, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(cuda_backend, "_functions", {})
    monkeypatch.setattr(cuda_backend, "_streams", {})
    monkeypatch.setattr(cuda_loader, "load_module", lambda name, index: types.SimpleNamespace(function=lambda e: function))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=0))


def test_a_failed_launch_names_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's own error path: a driver error becomes a KernelLaunchError naming
    the entry point and grid."""
    from detkit.errors import KernelLaunchError

    class Function:
        def __call__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: too many resources requested for launch")

    _stand_in_cupy(monkeypatch, Function())
    with pytest.raises(KernelLaunchError, match=r"mm_tc_x_kmajor \(matmul.cu\) on cuda:0 with grid \(2, 1, 1\)") as err:
        cuda_backend._launch(torch.device("cuda", 0), "matmul.cu", "mm_tc_x_kmajor", (2, 1, 1), 128, ())
    assert "OUT_OF_RESOURCES" in str(err.value) and "CUDA_LAUNCH_BLOCKING=1" in str(err.value)


def test_tensor_core_shared_memory_sizes_match_the_kernels(compiler: str) -> None:
    """The dynamic shared memory the launcher passes (TileConfig.smem) is what each
    configuration's TcCfg / WgCfg::SMEM_BYTES says, read from the compiled PTX."""
    import re

    ptx = "".join(cuda_loader.compile_source(cuda_loader.kernel_source(f), f, arch, output="ptx",
                                             compiler=compiler).decode()
                  for f, arch in (("matmul_tiles.cu", "sm_90"), ("matmul_sm90.cu", "sm_90a")))
    declared = {m[0]: int(m[1]) for m in re.findall(r"mm_tc_(\w+)_smem_bytes = (\d+);", ptx)}
    declared |= {f"wgmma_{m[0]}": int(m[1]) for m in re.findall(r"mm_wg_(\w+)_smem_bytes = (\d+);", ptx)}
    configs = [*cuda_backend.TILE_CATALOGUE[torch.bfloat16], *cuda_backend.TILE_CATALOGUE[torch.float16],
               *(c for c in cuda_backend.MATMUL_TILES.values() if c.tensor_cores)]
    for cfg in configs:
        assert declared[cfg.name] == cfg.smem, (cfg.name, declared[cfg.name], cfg.smem)
    # the tables' defaults stay within the 48 KiB every GPU grants without opting in
    assert all(c.smem <= 48 * 1024 for c in cuda_backend.MATMUL_TILES.values())
    assert sum(c.smem > 48 * 1024 for c in cuda_backend.TILE_CATALOGUE[torch.bfloat16]) >= 3


def test_launcher_opts_in_to_large_shared_memory_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 48 KiB the launcher raises the kernel's dynamic shared memory limit (once per
    loaded function) and passes the size at every launch; below it, it sets nothing."""
    attrs: list[tuple[int, int, int]] = []
    launches: list[int] = []

    class Function:
        ptr = 1234

        def __call__(self, grid: object, block: object, args: object, shared_mem: int = 0, stream: object = None) -> None:
            launches.append(shared_mem)

    _stand_in_cupy(monkeypatch, Function(), attrs)
    dev = torch.device("cuda", 0)
    for _ in range(2):
        cuda_backend._launch(dev, "matmul_tiles.cu", "big", (1, 1, 1), 128, (), shared_mem=147456)
        cuda_backend._launch(dev, "matmul.cu", "small", (1, 1, 1), 128, (), shared_mem=46080)
    assert attrs == [(1234, 8, 147456)]  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert launches == [147456, 46080, 147456, 46080]
