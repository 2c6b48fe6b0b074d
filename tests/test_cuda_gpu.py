"""GPU proof for detkit's CUDA kernels (any sm_80+ NVIDIA GPU; written for H100/H200).

* batch invariance, bitwise, for every kernel, dtype and guarantee: every M in 1..2048
  (all rows compared) plus shifted batch positions;
* portable=True on CUDA equals the CPU portable backend bit for bit;
* attention: decode vs prefill, left/right padding, batch composition, GQA;
* sanity of portable=False values against a float64 reference;
* launches follow torch's current stream;
* hypothesis-drawn shapes for matmul, the row ops and attention;
* the torch mode on a CUDA Hugging Face model, portable logits CUDA == CPU, the probe CLI.

Skipped, with the reason, where no usable GPU + CuPy is present. Run by scripts/gpu-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detkit.kernels import cuda as cuda_backend
from detkit.mode import batch_invariant

_OK, _REASON = cuda_backend.available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _OK, reason=f"needs an NVIDIA GPU (sm_80+) with CUDA torch and CuPy: {_REASON}"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_M = 2048
SHIFTS = (1, 3, 63)
DEV = "cuda"


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise equality; on a mismatch, detkit's own report (count, share, max ULP, the
    first differing elements as a table)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype)
    if got.device != want.device:  # torch.equal refuses tensors on two devices
        got, want = got.cpu(), want.cpu()
    if torch.equal(bits(got), bits(want)):
        return
    from detkit.testing import assert_bitwise_equal

    assert_bitwise_equal(got.cpu(), want.cpu(), name=what)
    raise AssertionError(f"{what}: the bits differ")  # assert_bitwise_equal raised already


# Composed ops whose last step is torch's own IEEE division (F.normalize: x / the clamped
# norm), which the mode leaves to torch as exact. A NaN it makes carries the device's bits:
# x86 gives 0xFFC00000 for inf / inf and keeps an operand NaN's, CUDA gives 0x7FFFFFFF
# for every NaN (measured on an H200). Their NaNs are compared as NaNs, everything else
# bit for bit.
TORCH_NAN_LAST = frozenset({"normalize", "normalize_2d"})


def nan_canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU with every NaN replaced by the quiet NaN 0x7FC00000 (its dtype's)."""
    t = t.cpu()
    return torch.where(t.isnan(), torch.full_like(t, math.nan), t)


def assert_composed_bits_equal(results: list[tuple[str, object, object]], what: str) -> None:
    """Every (name, CUDA result, CPU result) equal bit for bit, all names checked before
    failing; names in TORCH_NAN_LAST with their NaNs compared as NaNs."""
    failures = []
    for name, got, want in results:
        pairs = zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                    strict=True)
        for g, w in pairs:
            g, w = g.cpu(), w.cpu()
            if name in TORCH_NAN_LAST:
                g, w = nan_canonical(g), nan_canonical(w)
            try:
                assert_bits_equal(g, w, f"{name} {what}")
            except AssertionError as err:
                failures.append(str(err))
    assert not failures, f"{len(failures)} of the composed results differ:\n\n" + "\n\n".join(failures)


def rand(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0,
         device: str | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device or DEV)


def sweep(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, what: str) -> None:
    """f(x[s:s+m]) == f(x)[s:s+m] bitwise for every m in 1..MAX_M (s = 0) and for shifted
    starts; all rows compared. Mismatch flags stay on the GPU until the end (no syncs)."""
    full = f(x)
    full_bits = bits(full)
    cases = [(0, m) for m in range(1, MAX_M + 1)]
    cases += [(s, m) for s in SHIFTS for m in (1, 2, 17, 255, 256, 1000, MAX_M - 64) if s + m <= x.shape[0]]
    flags = torch.zeros(len(cases), dtype=torch.bool, device=x.device)
    for idx, (s, m) in enumerate(cases):
        flags[idx] = (bits(f(x[s : s + m])) != full_bits[s : s + m]).any()
    failed = [cases[i] for i in flags.nonzero().flatten().tolist()]
    if failed:
        s, m = failed[0]
        message = f"{what}: batch variant for (start, rows) in {failed[:10]} ({len(failed)} cases)"
        assert_bits_equal(f(x[s : s + m]), full[s : s + m], f"{message}; the first case again")
        raise AssertionError(f"{message}; the first case gave the full batch's bits when run again: nondeterminism")


# ----------------------------------------------------------------------------- batch invariance


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_batch_invariant(dtype: torch.dtype, portable: bool) -> None:
    k, n = 1000, 387  # K not a multiple of any tile depth, N not of any tile width
    x = rand((MAX_M + 64, k), dtype, 1)
    w = rand((n, k), dtype, 2, 0.05)  # nn.Linear weight; passed transposed (k-contiguous)
    bias = rand((n,), dtype, 3)
    sweep(lambda t: cuda_backend.matmul(t, w.t(), bias, portable=portable), x, f"matmul {dtype} portable={portable}")


@pytest.mark.parametrize("portable", [False, True])
def test_matmul_batch_invariant_other_layouts(portable: bool) -> None:
    dtype = torch.bfloat16
    x = rand((MAX_M + 64, 999), dtype, 4)  # K % 8 != 0: the element-wise load path
    b = rand((999, 200), dtype, 5, 0.05)   # n-contiguous B
    sweep(lambda t: cuda_backend.matmul(t, b, None, portable=portable), x, f"matmul K=999 nmajor portable={portable}")


@pytest.mark.parametrize("portable", [False, True])
def test_bmm_batch_invariant(portable: bool) -> None:
    a = rand((16, 70, 128), torch.bfloat16, 6)
    b = rand((16, 128, 96), torch.bfloat16, 7)
    full = cuda_backend.matmul(a, b, None, portable=portable)
    for nb in range(1, 17):
        for s in (0, 16 - nb):
            assert_bits_equal(cuda_backend.matmul(a[s : s + nb], b[s : s + nb], None, portable=portable),
                              full[s : s + nb], f"bmm batch {s}:{s + nb}")


def _routed(s: int, experts: int, seed: int) -> torch.Tensor:
    """Group ends (int32, on the GPU) of ``s`` token rows routed at random to ``experts``
    experts, some of which get none."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(experts, generator=g) * (torch.rand(experts, generator=g) > 0.2)
    counts = torch.bincount(torch.multinomial(weights + 1e-9, s, replacement=True, generator=g), minlength=experts)
    return counts.cumsum(0).to(torch.int32).to(DEV)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matmul_rows_do_not_depend_on_their_experts_other_tokens(dtype: torch.dtype, portable: bool) -> None:
    """MoE experts in one grouped launch (offsets read on the GPU): every token's row is
    bitwise its product alone with its expert's matrix, for 2048 tokens over 64 experts;
    the same tokens split over launches of other sizes give the same rows."""
    s, experts, k, n = 2048, 64, 1000, 387
    x = rand((s, k), dtype, 100)
    w = rand((experts, n, k), dtype, 101, 0.05).transpose(1, 2)  # HF's expert weights, transposed views
    ends = _routed(s, experts, 102)
    full = cuda_backend.grouped_matmul(x, w, ends, portable=portable)
    host_ends = ends.tolist()
    flags = torch.zeros(s, dtype=torch.bool, device=DEV)
    one = torch.ones(1, dtype=torch.int32, device=DEV)
    for e, (start, end) in enumerate(zip([0, *host_ends], host_ends)):
        for r in range(start, end):
            alone = cuda_backend.grouped_matmul(x[r : r + 1], w[e : e + 1], one, portable=portable)
            flags[r] = (bits(alone) != bits(full[r : r + 1])).any()
        if end > start:
            assert_bits_equal(full[start:end], cuda_backend.matmul(x[start:end], w[e], None, portable=portable),
                              f"expert {e}: grouped vs plain matmul of its rows")
    bad = flags.nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} rows differ from their product alone; first rows {bad[:10]}"
    # the first 700 tokens alone, routed as they were in the full batch
    part_ends = ends.clamp(max=700)
    assert_bits_equal(cuda_backend.grouped_matmul(x[:700], w, part_ends, portable=portable), full[:700], "700 tokens")


def test_grouped_matmul_under_the_mode_never_waits_for_the_gpu() -> None:
    """torch._grouped_mm under the mode reads the routing on the GPU: no host
    synchronisation per MoE layer (torch's sync debug mode turns one into an error)."""
    x = rand((512, 256), torch.bfloat16, 103)
    w = rand((8, 128, 256), torch.bfloat16, 104).transpose(1, 2)
    ends = _routed(512, 8, 105)
    with batch_invariant(strict=True) as bi:
        torch._grouped_mm(x, w, offs=ends)  # warm: first-use compilation and loading may wait
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = torch._grouped_mm(x, w, offs=ends)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert bi.routed().get("_grouped_mm", 0) == 2, bi.coverage()
    assert_bits_equal(got, cuda_backend.grouped_matmul(x, w, ends), "mode vs backend")


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_configuration_gives_the_same_bits(dtype: torch.dtype, portable: bool) -> None:
    """Each mma.sync / CUDA-core configuration of the catalogue (benchmarked by
    bench_cuda.py, any of which the tables may pick) reproduces the default kernel's bits,
    on the GPU's own mma."""
    x = rand((600, 4104), dtype, 14)
    w = rand((1000, 4104), dtype, 15, 0.02)
    bias = rand((1000,), dtype, 16)
    want = cuda_backend.matmul(x, w.t(), bias, portable=portable)
    catalogue = (cuda_backend.PORTABLE_TILE_CATALOGUE if portable else cuda_backend.TILE_CATALOGUE)[dtype]
    dev = torch.device(DEV, torch.cuda.current_device())
    # the wgmma family has tests of its own (test_wgmma_*), in their own process in gpu-check
    runnable = [c for c in catalogue if cuda_backend.fits(c, dev) and c.family != "wgmma"]
    assert runnable and all(cuda_backend.fits(c, dev) for c in cuda_backend.MATMUL_TILES.values())
    for cfg in runnable:
        for m in (1, 16, 64, 600):
            got = cuda_backend.matmul(x[:m], w.t(), bias, portable=portable, tile=cfg)
            assert_bits_equal(got, want[:m], f"{cfg.name} M={m} portable={portable}")
        assert_bits_equal(cuda_backend.matmul(x[:64], w.t().contiguous(), bias, portable=portable, tile=cfg),
                          want[:64], f"{cfg.name} n-major B")


def _special_rows(dtype: torch.dtype, k: int, n: int) -> tuple[torch.Tensor, ...]:
    """CPU (5, k), weight (n, k) and bias (n,): in the first n / 2 columns row 0's products
    all underflow below zero and row 1's above it (which signed zero the GPU's tensor
    cores give is theirs to decide; every configuration must give the same one), row 2
    has a NaN, row 3 an Inf, row 4 zeros in its last 16 k; the bias is -0.0 there."""
    w = rand((n, k), torch.float32, 83, 0.1, device="cpu").abs() + 0.5
    w[: n // 2] = 1e-30
    a = rand((5, k), torch.float32, 84, device="cpu")
    a[0], a[1] = -1e-30, 1e-30
    a[2, k // 3] = float("nan")
    a[3, k // 2] = float("inf")
    a[4, max(0, k - 16) :] = 0.0
    bias = torch.cat([torch.full((n // 2,), -0.0), rand((n - n // 2,), torch.float32, 85, device="cpu")])
    return a.to(dtype), w.to(dtype), bias.to(dtype)


def _assert_nan_and_inf_as_in_float64(got: torch.Tensor, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                                      what: str) -> None:
    ref = a.double() @ w.double().t() + bias.double()
    got = got.cpu()
    assert torch.equal(got[2:4].isnan(), ref[2:4].isnan()), f"{what}: NaN rows"
    inf = ref[2:4].isinf()
    assert torch.equal(got[2:4][inf].double(), ref[2:4][inf]), f"{what}: Inf rows"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_tile_configuration_keeps_signed_zeros_nan_and_inf(dtype: torch.dtype) -> None:
    """Rows ending at a signed zero, with a NaN, an Inf or zeros in their last k steps:
    each mma.sync / CUDA-core configuration gives the default's bits at M = 5 and 1, for
    K = 96 (a whole number of some tiles' depth, not of others') and 40; NaN and Inf as
    in float64; portable=True gives the CPU's bits (ChunkDot turns -0.0 into +0.0)."""
    dev = torch.device(DEV, torch.cuda.current_device())
    for k in (96, 40):
        a, w, bias = _special_rows(dtype, k, 72)
        ac, wc, bc = a.to(DEV), w.to(DEV), bias.to(DEV)
        for portable in (False, True):
            catalogue = (cuda_backend.PORTABLE_TILE_CATALOGUE if portable else cuda_backend.TILE_CATALOGUE)[dtype]
            for b, layout in ((wc.t(), "k-major"), (wc.t().contiguous(), "n-major")):
                want = cuda_backend.matmul(ac, b, bc, portable=portable)
                for cfg in (c for c in catalogue if cuda_backend.fits(c, dev) and c.family != "wgmma"):
                    what = f"{cfg.name} K={k} {layout} portable={portable}"
                    assert_bits_equal(cuda_backend.matmul(ac, b, bc, portable=portable, tile=cfg), want, what)
                    assert_bits_equal(cuda_backend.matmul(ac[:1], b, bc, portable=portable, tile=cfg), want[:1],
                                      f"{what} M=1")
            if portable:
                assert_bits_equal(want, REF.matmul(a, w.t(), bias), f"portable K={k} (reference: {REF_NAME})")
            _assert_nan_and_inf_as_in_float64(want, a, w, bias, f"K={k} portable={portable}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_keeps_signed_zeros_nan_and_inf(dtype: torch.dtype) -> None:
    """The wgmma family on the same rows: every configuration gives the first one's bits
    (both B layouts, M = 5 and 1, K = 96 and 40); NaN and Inf as in float64."""
    configs = _wgmma_configs(dtype)
    for k in (96, 40):
        a, w, bias = _special_rows(dtype, k, 72)
        ac, wc, bc = a.to(DEV), w.to(DEV), bias.to(DEV)
        want = cuda_backend.matmul(ac, wc.t(), bc, tile=configs[0])
        _assert_nan_and_inf_as_in_float64(want, a, w, bias, f"{configs[0].name} K={k}")
        for cfg in configs:
            for b, layout in ((wc.t(), "k-major"), (wc.t().contiguous(), "n-major")):
                what = f"{cfg.name} K={k} {layout}"
                assert_bits_equal(cuda_backend.matmul(ac, b, bc, tile=cfg), want, what)
                assert_bits_equal(cuda_backend.matmul(ac[:1], b, bc, tile=cfg), want[:1], f"{what} M=1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_configuration_fits_an_sm(dtype: torch.dtype) -> None:
    """The driver's occupancy (benchmarks/bench_cuda.py reports it beside the sweep) says
    at least one CTA of each runnable configuration fits an SM, for both B layouts: with
    the shared-memory opt-in, registers and threads as the launcher uses them."""
    dev = torch.device(DEV, torch.cuda.current_device())
    configs = [c for c in (*cuda_backend.TILE_CATALOGUE[dtype], *cuda_backend.PORTABLE_TILE_CATALOGUE[dtype])
               if cuda_backend.fits(c, dev) and c.family != "wgmma"]
    for cfg in configs:
        for kmajor in (True, False):
            ctas = cuda_backend.ctas_per_sm(cfg, dev, kmajor=kmajor)
            assert 1 <= ctas <= 32, (cfg.name, kmajor, ctas)


def _wgmma_configs(dtype: torch.dtype) -> list[cuda_backend.TileConfig]:
    dev = torch.device(DEV, torch.cuda.current_device())
    if torch.cuda.get_device_capability(dev) != (9, 0):
        pytest.skip(f"wgmma needs an sm_90 GPU (H100, H200); this is {torch.cuda.get_device_name(dev)}")
    return [c for c in cuda_backend.TILE_CATALOGUE[dtype] if c.family == "wgmma" and cuda_backend.fits(c, dev)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_values_are_right(dtype: torch.dtype) -> None:
    """Each wgmma configuration against float64: a wrong descriptor, swizzle or fragment
    index gives errors of the order of the values. M, N and K are not multiples of any
    tile, K spans more k tiles than any pipeline has stages."""
    a = rand((300, 1000), dtype, 90)
    w = rand((387, 1000), dtype, 91, 0.05)
    bias = rand((387,), dtype, 92)
    ref = a.double() @ w.double().t() + bias.double()
    scale = (a.double().abs() @ w.double().abs().t()) + bias.double().abs()
    ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    for cfg in _wgmma_configs(dtype):
        for what, b in (("k-major", w.t()), ("n-major", w.t().contiguous())):
            got = cuda_backend.matmul(a, b, bias, tile=cfg).double()
            err = (got - ref).abs() - (2 * ulp * ref.abs() + 5e-5 * scale)
            assert bool((err <= 0).all()), (
                f"{cfg.name} {what}: values off by up to {float(err.max()):.3g} past the tolerance")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_batch_invariant_and_configurations_agree(dtype: torch.dtype) -> None:
    """Every wgmma configuration: rows independent of M for every M in 1..MAX_M, and the
    same bits as the family's first configuration (both B layouts, unaligned rows)."""
    configs = _wgmma_configs(dtype)
    x = rand((MAX_M + 64, 4104), dtype, 93)
    w = rand((1000, 4104), dtype, 94, 0.02)
    bias = rand((1000,), dtype, 95)
    first = cuda_backend.matmul(x[:600], w.t(), bias, tile=configs[0])
    for cfg in configs:
        sweep(lambda t, c=cfg: cuda_backend.matmul(t, w.t(), bias, tile=c), x, f"{cfg.name}")
        assert_bits_equal(cuda_backend.matmul(x[:600], w.t(), bias, tile=cfg), first,
                          f"{cfg.name} vs {configs[0].name}")
        assert_bits_equal(cuda_backend.matmul(x[:64], w.t().contiguous(), bias, tile=cfg), first[:64],
                          f"{cfg.name} n-major B")
        # K = 4103 through a view: unaligned rows, element-wise loads; zero-padded K gives the same bits
        unaligned = cuda_backend.matmul(x[:64, 1:], w[:, 1:].t(), bias, tile=cfg)
        padded = cuda_backend.matmul(torch.nn.functional.pad(x[:64, 1:], (0, 1)),
                                     torch.nn.functional.pad(w[:, 1:], (0, 1)).t(), bias, tile=cfg)
        assert_bits_equal(unaligned, padded, f"{cfg.name} element-wise loads")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wgmma_batched_entries_are_their_own_products(dtype: torch.dtype, request: pytest.FixtureRequest) -> None:
    """The wgmma family's batched forms on the hardware ((B, M, K) @ (B, K, N) in both B
    layouts, and @ one (K, N) weight: batch stride 0): each entry has the bits of its own
    2-D product. Recorded, not asserted: how many of these shapes give other bits than the
    table's mma.sync default (K from 1 to 4104, unaligned views included) -- 0 is what a
    wgmma default on sm_90 needs, since the grouped MoE launch keeps mma.sync
    (docs/cuda.md)."""
    configs = _wgmma_configs(dtype)
    a = rand((3, 20 * 40 + 4), dtype, 70)[:, : 20 * 40].reshape(3, 20, 40)  # batch stride 804 elements
    b3, w = rand((3, 40, 72), dtype, 71), rand((72, 40), dtype, 72)
    bias = rand((72,), dtype, 73)
    for cfg in configs:
        for b, what in ((b3, "n-major"), (b3.transpose(1, 2).contiguous().transpose(1, 2), "k-major"),
                        (w.t(), "one weight")):
            full = cuda_backend.matmul(a, b, bias, tile=cfg)
            for i in range(3):
                entry = cuda_backend.matmul(a[i], b[i] if b.dim() == 3 else b, bias, tile=cfg)
                assert_bits_equal(full[i], entry, f"{cfg.name} batched {what}, entry {i}")
    differing = []
    for k in (1, 8, 15, 16, 17, 40, 96, 255, 256, 1000, 4104):
        for m, n in ((1, 72), (7, 387), (129, 8), (300, 136)):
            x, wk = rand((m, k + 1), dtype, 80 + k), rand((n, k + 1), dtype, 81 + k, 0.1)
            forms = {"k-major": (x[:, :k].contiguous(), wk[:, :k].contiguous().t()),
                     "n-major": (x[:, :k].contiguous(), wk[:, :k].t().contiguous()),
                     "unaligned": (x[:, 1:], wk[:, 1:].t())}
            for layout, (xa, wb) in forms.items():
                default = cuda_backend.matmul(xa, wb, None)
                differing += [f"{cfg.name} M={m} K={k} N={n} {layout}" for cfg in configs
                              if not torch.equal(bits(cuda_backend.matmul(xa, wb, None, tile=cfg)), bits(default))]
    request.node.user_properties.append(
        (f"wgmma_{dtype}_shapes_differing_from_the_mma_sync_default", f"{len(differing)} of {11 * 4 * 3 * len(configs)}"
         + (f": {differing[:5]}" if differing else "")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_wgmma_rows_are_their_groups_products(dtype: torch.dtype, request: pytest.FixtureRequest) -> None:
    """The grouped wgmma kernel (GROUPED_TILE_CATALOGUE, the sm_90 table's candidate): 2048
    tokens over 64 experts in one launch, each expert's rows with the bits of a plain wgmma
    matmul of them, in both B layouts, and a token alone with its expert the same bits.
    Recorded, not asserted: how many rows differ from the table's mma.sync grouped launch
    (0 is what switching the sm_90 table to this configuration keeps every bit of)."""
    _wgmma_configs(dtype)  # skips off sm_90
    (tile,) = cuda_backend.GROUPED_TILE_CATALOGUE[dtype]
    s, experts, k, n = 2048, 64, 1000, 387
    x = rand((s, k), dtype, 110)
    w = rand((experts, n, k), dtype, 111, 0.05)
    ends = _routed(s, experts, 112)
    host_ends = ends.tolist()
    one = torch.ones(1, dtype=torch.int32, device=DEV)
    differing = 0
    for layout, b in (("k-major", w.transpose(1, 2)), ("n-major", w.transpose(1, 2).contiguous())):
        full = cuda_backend.grouped_matmul(x, b, ends, tile=tile)
        for e, (start, end) in enumerate(zip([0, *host_ends], host_ends)):
            if end > start:
                assert_bits_equal(full[start:end], cuda_backend.matmul(x[start:end], b[e], None, tile=tile),
                                  f"{layout} expert {e}: grouped vs plain wgmma matmul of its rows")
                alone = cuda_backend.grouped_matmul(x[start : start + 1], b[e : e + 1], one, tile=tile)
                assert_bits_equal(alone, full[start : start + 1], f"{layout} expert {e}: its first token alone")
        table = cuda_backend.grouped_matmul(x, b, ends)
        differing += int((bits(full) != bits(table)).any(-1).sum())
    request.node.user_properties.append(
        (f"grouped_wgmma_{dtype}_rows_differing_from_the_mma_sync_grouped_launch", f"{differing} of {2 * s}"))


ROW_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": lambda x, w, b, p: cuda_backend.softmax(x, False, portable=p),
    "log_softmax": lambda x, w, b, p: cuda_backend.softmax(x, True, portable=p),
    "rms_norm": lambda x, w, b, p: cuda_backend.rms_norm(x, w, 1e-6, portable=p),
    "layer_norm": lambda x, w, b, p: cuda_backend.layer_norm(x, w, b, 1e-5, portable=p),
    "sum": lambda x, w, b, p: cuda_backend.row_sum(x, False, portable=p),
    "mean": lambda x, w, b, p: cuda_backend.row_sum(x, True, portable=p),
    "cumsum": lambda x, w, b, p: cuda_backend.row_cumsum(x, portable=p),
}


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(ROW_OPS))
def test_row_op_batch_invariant(op: str, dtype: torch.dtype, portable: bool) -> None:
    length = 1000
    x = rand((MAX_M + 64, length), dtype, 10, 3.0)
    w, b = rand((length,), dtype, 11), rand((length,), dtype, 12)
    fn = ROW_OPS[op]
    sweep(lambda t: fn(t, w, b, portable), x, f"{op} {dtype} portable={portable}")


@pytest.mark.parametrize("portable", [False, True])
def test_vocab_softmax_batch_invariant(portable: bool) -> None:
    x = rand((64, 151936), torch.bfloat16, 13, 4.0)
    for log in (False, True):
        full = cuda_backend.softmax(x, log, portable=portable)
        for m in (1, 2, 7, 33, 64):
            assert_bits_equal(cuda_backend.softmax(x[:m], log, portable=portable), full[:m], f"vocab softmax rows {m}")
        assert_bits_equal(cuda_backend.softmax(x[40:41], log, portable=portable), full[40:41], "vocab softmax row 40")


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_and_sum_ignore_padding_around_a_row(dtype: torch.dtype, portable: bool) -> None:
    """Masked logits before and after a row (eager attention's padding keys: finfo.min)
    and zeros before a sum leave the row's bits unchanged: the torch mode relies on it."""
    x = rand((6, 1000), dtype, 14, 3.0)
    for pad in (1, 7, 2051):
        left = (rand((6, pad), torch.float32, 15) + torch.finfo(dtype).min).to(dtype)
        right = torch.full((6, 9), float("-inf"), dtype=dtype, device=DEV)
        padded = torch.cat([left, x, right], 1)
        for log in (False, True):
            got = cuda_backend.softmax(padded, log, portable=portable)[:, pad : pad + 1000]
            assert_bits_equal(got, cuda_backend.softmax(x, log, portable=portable), f"softmax log={log}, {pad} in front")
        zeros = torch.cat([torch.zeros((6, pad), dtype=dtype, device=DEV), x], 1)
        assert_bits_equal(cuda_backend.row_sum(zeros, False, portable=portable),
                          cuda_backend.row_sum(x, False, portable=portable), f"sum, {pad} zeros in front")
        assert_bits_equal(cuda_backend.row_cumsum(zeros, portable=portable)[:, pad:],
                          cuda_backend.row_cumsum(x, portable=portable), f"cumsum, {pad} zeros in front")


# ----------------------------------------------------------------------------- attention


def _qkv(dtype: torch.dtype, nb: int, lq: int, lk: int, seed: int) -> tuple[torch.Tensor, ...]:
    q = rand((nb, 8, lq, 128), dtype, seed)
    k = rand((nb, 2, lk, 128), dtype, seed + 1)  # GQA: 8 query heads on 2 kv heads
    v = rand((nb, 2, lk, 128), dtype, seed + 2)
    return q, k, v


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_equals_prefill(dtype: torch.dtype, portable: bool) -> None:
    length = 300
    q, k, v = _qkv(dtype, 2, length, length, 20)
    causal = torch.ones(length, length, dtype=torch.bool, device=DEV).tril().expand(2, 8, length, length)
    prefill = cuda_backend.attention(q, k, v, causal, 1 / math.sqrt(128), portable=portable)
    got = torch.empty_like(prefill)
    for t in range(length):
        got[:, :, t : t + 1] = cuda_backend.attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], None, 1 / math.sqrt(128), portable=portable)
    assert_bits_equal(got, prefill, f"decode vs prefill {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_padding_and_batch_composition(dtype: torch.dtype) -> None:
    scale = 0.09
    lengths = [1, 5, 31, 32, 33, 100, 257, 300]
    total = max(lengths) + 40
    singles, singles_f = [], []
    qs, ks, vs = [], [], []
    for i, length in enumerate(lengths):
        q, k, v = _qkv(dtype, 1, length, length, 100 + 3 * i)
        causal = torch.ones(length, length, dtype=torch.bool, device=DEV).tril().expand(1, 8, length, length)
        singles.append(cuda_backend.attention(q, k, v, causal, scale))
        # a float mask takes the canonical kernel under portable=False too: compare like with like
        singles_f.append(cuda_backend.attention(q, k, v, torch.where(causal, 0.0, float("-inf")), scale))
        qs.append(q), ks.append(k), vs.append(v)
    # Left-pad every sequence to `total` with junk keys/queries, in one batch.
    pad_q = torch.zeros(len(lengths), 8, total, 128, dtype=dtype, device=DEV)
    pad_k = rand((len(lengths), 2, total, 128), dtype, 999)
    pad_v = rand((len(lengths), 2, total, 128), dtype, 998)
    mask = torch.zeros(len(lengths), 1, total, total, dtype=torch.bool, device=DEV)
    for i, length in enumerate(lengths):
        off = total - length
        pad_q[i, :, off:] = qs[i][0]
        pad_k[i, :, off:] = ks[i][0]
        pad_v[i, :, off:] = vs[i][0]
        mask[i, 0, off:, off:] = torch.ones(length, length, dtype=torch.bool, device=DEV).tril()
    batched = cuda_backend.attention(pad_q, pad_k, pad_v, mask.expand(-1, 8, -1, -1), scale)
    fmask = torch.where(mask, 0.0, float("-inf")).to(torch.float32).expand(-1, 8, -1, -1)
    batched_f = cuda_backend.attention(pad_q, pad_k, pad_v, fmask, scale)
    for i, length in enumerate(lengths):
        off = total - length
        assert_bits_equal(batched[i : i + 1, :, off:], singles[i], f"left padding, bool mask, sequence {i}")
        assert_bits_equal(batched_f[i : i + 1, :, off:], singles_f[i], f"left padding, float mask, sequence {i}")
    # Right padding: extra masked keys after the real ones change nothing.
    q, k, v = qs[5], ks[5], vs[5]
    extra_k = torch.cat([k, rand((1, 2, 50, 128), dtype, 77)], dim=2)
    extra_v = torch.cat([v, rand((1, 2, 50, 128), dtype, 78)], dim=2)
    rmask = torch.zeros(100, 150, dtype=torch.bool, device=DEV)
    rmask[:, :100] = torch.ones(100, 100, dtype=torch.bool, device=DEV).tril()
    right = cuda_backend.attention(q, extra_k, extra_v, rmask.expand(1, 8, 100, 150), scale)
    assert_bits_equal(right, singles[5], "right padding")


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_attention_values_and_workspace_chunks(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """portable=False split KV (Lk = 1000: 8 splits of the CUDA-core kernel for float32, 4
    of the tensor-core kernel for head dim 128 in bfloat16 and float16) against float64
    SDPA, and the same bits when the workspace is cut into chunks of queries. The
    tensor-core kernel rounds P to the dtype before P V, as FlashAttention does: its bound
    adds 1.5 ulp of the largest |v|."""
    q, k, v = _qkv(dtype, 2, 16, 1000, 300)
    mask = (rand((2, 1, 16, 1000), torch.float32, 301) > -1.0).expand(2, 8, 16, 1000)
    got = cuda_backend.attention(q, k, v, mask, 0.088)
    kk, vv = k.double().repeat_interleave(4, 1), v.double().repeat_interleave(4, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * 0.088
    want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    err = (got.double() - want).abs()
    p_rounding = 0.0 if dtype == torch.float32 else 1.5 * ulp * float(v.double().abs().max())
    assert bool((err <= ulp * want.abs() + 1e-5 + p_rounding).all()), f"split attention max error {err.max().item()}"
    monkeypatch.setattr(cuda_backend, "_ATT_WORKSPACE_FLOATS", 5 * 8 * 130)  # 5 queries per chunk
    assert_bits_equal(cuda_backend.attention(q, k, v, mask, 0.088), got, "chunked split-KV workspace")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_tensor_core_attention_rows_in_a_sliding_window_and_masked_inf_nan(dtype: torch.dtype) -> None:
    """The tensor-core kernel: with a sliding window every row of a tile has its own
    anchor, and each row still gets the bits of its decode against its window alone; keys
    no query keeps may hold inf or NaN without changing a bit."""
    lk, window = 600, 200
    q, k, v = _qkv(dtype, 1, lk, lk, 400)
    i, j = torch.arange(lk, device=DEV)[:, None], torch.arange(lk, device=DEV)[None, :]
    slide = ((j <= i) & (j > i - window)).expand(1, 8, lk, lk)
    full = cuda_backend.attention(q, k, v, slide, 0.088)
    for p in (0, 63, 64, 199, 200, 255, 256, 257, 511, 599):
        lo = max(0, p - window + 1)
        alone = cuda_backend.attention(q[:, :, p : p + 1], k[:, :, lo : p + 1], v[:, :, lo : p + 1], None, 0.088)
        assert_bits_equal(alone, full[:, :, p : p + 1], f"row {p}, window [{lo}, {p}]")
    keep = torch.ones(lk, dtype=torch.bool, device=DEV)
    keep[:37], keep[-50:], keep[300] = False, False, False
    mask = keep.expand(1, 8, lk, lk)
    want = cuda_backend.attention(q, k, v, mask, 0.088)
    for bad in (float("inf"), float("nan")):
        kb, vb = k.clone(), v.clone()
        kb[:, :, ~keep], vb[:, :, ~keep] = bad, bad
        assert_bits_equal(cuda_backend.attention(q, kb, vb, mask, 0.088), want, f"masked keys = {bad}")


def test_attention_fully_masked_rows_are_zero() -> None:
    q, k, v = _qkv(torch.bfloat16, 1, 4, 10, 200)
    mask = torch.zeros(1, 8, 4, 10, dtype=torch.bool, device=DEV)
    out = cuda_backend.attention(q, k, v, mask, 0.1)
    assert bool((out == 0).all())


# ----------------------------------------------------------------------------- portable == CPU portable

# The reference: the CPU portable backend (numba) where installed, else the executable
# specification itself (plain Python, so smaller shapes). Both are the canonical orders.
try:
    from detkit.kernels import portable_cpu as REF

    REF_NAME, BIG = "portable_cpu", True
except ImportError:  # numba missing on the GPU machine
    from detkit.kernels import spec as REF  # type: ignore[no-redef]

    REF_NAME, BIG = "spec", False


def _adversarial(dtype: torch.dtype, rows: int, length: int, seed: int) -> torch.Tensor:
    x = rand((rows, length), torch.float32, seed, 2.0, device="cpu")
    x[0, : length // 2] = 0.0
    x[1, ::3] = float("-inf")
    x[2, length // 2] = float("nan")
    x[3] *= 1e30 if dtype == torch.float32 else 3e4
    x[4] *= 1e-40 if dtype == torch.float32 else 1e-6
    x[5, 0::2], x[5, 1::2] = 1000.0, -1000.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 33, 1000, 4097])
def test_portable_row_ops_equal_cpu(dtype: torch.dtype, length: int) -> None:
    rows = 64 if BIG else 8
    if not BIG:
        length = min(length, 300)
    x = _adversarial(dtype, rows, length, 30)
    w = rand((length,), dtype, 31, device="cpu")
    b = rand((length,), dtype, 32, device="cpu")
    xc, wc, bc = x.to(DEV), w.to(DEV), b.to(DEV)
    for log in (False, True):
        assert_bits_equal(cuda_backend.softmax(xc, log, portable=True), REF.softmax(x, log), f"softmax log={log}")
    for mean in (False, True):
        assert_bits_equal(cuda_backend.row_sum(xc, mean, portable=True), REF.row_sum(x, mean), "row_sum")
    assert_bits_equal(cuda_backend.row_cumsum(xc, portable=True), REF.row_cumsum(x), "row_cumsum")
    assert_bits_equal(cuda_backend.rms_norm(xc, wc, 1e-6, portable=True), REF.rms_norm(x, w, 1e-6), "rms_norm")
    assert_bits_equal(cuda_backend.rms_norm(xc, None, 1e-6, portable=True), REF.rms_norm(x, None, 1e-6), "rms")
    for wt, bb in ((w, b), (None, None), (w, None), (None, b)):
        got = cuda_backend.layer_norm(xc, None if wt is None else wc, None if bb is None else bc, 1e-5, portable=True)
        assert_bits_equal(got, REF.layer_norm(x, wt, bb, 1e-5), f"layer_norm w={wt is not None} b={bb is not None}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_matmul_equals_cpu(dtype: torch.dtype) -> None:
    m, k, n = (64, 1000, 387) if BIG else (6, 600, 20)  # K > 256: ChunkDot's chunks
    a = _adversarial(dtype, m, k, 40)
    a[1] = torch.where(torch.isinf(a[1]), torch.zeros_like(a[1]), a[1])
    w = rand((n, k), dtype, 41, 0.05, device="cpu")
    bias = rand((n,), dtype, 42, device="cpu")
    want = REF.matmul(a, w.t(), bias)
    assert_bits_equal(cuda_backend.matmul(a.to(DEV), w.to(DEV).t(), bias.to(DEV), portable=True), want, "k-major B")
    assert_bits_equal(cuda_backend.matmul(a.to(DEV), w.t().contiguous().to(DEV), bias.to(DEV), portable=True),
                      want, "n-major B")
    nb, mm, kk, nn = (4, 33, 70, 50) if BIG else (2, 5, 40, 9)
    a3, b3 = rand((nb, mm, kk), dtype, 43, device="cpu"), rand((nb, kk, nn), dtype, 44, device="cpu")
    assert_bits_equal(cuda_backend.matmul(a3.to(DEV), b3.to(DEV), None, portable=True),
                      REF.matmul(a3, b3, None), "bmm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_portable_attention_equals_cpu(dtype: torch.dtype, mask_kind: str) -> None:
    nb, lq, lk, d, dv = (2, 33, 100, 64, 48) if BIG else (1, 5, 40, 16, 12)
    q = rand((nb, 4, lq, d), dtype, 50, device="cpu")
    k = rand((nb, 2, lk, d), dtype, 51, device="cpu")
    v = rand((nb, 2, lk, dv), dtype, 52, device="cpu")
    mask: torch.Tensor | None = None
    if mask_kind == "bool":
        mask = (rand((nb, 1, lq, lk), torch.float32, 53, device="cpu") > -0.5).expand(nb, 4, lq, lk)
    elif mask_kind == "float":
        mask = rand((nb, 4, lq, lk), torch.float32, 53, device="cpu")
        mask[0, :, :, :10] = float("-inf")
    elif mask_kind == "causal":
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq).expand(nb, 4, lq, lk)
    want = REF.attention(q, k, v, mask, 0.125)
    got = cuda_backend.attention(q.to(DEV), k.to(DEV), v.to(DEV), None if mask is None else mask.to(DEV), 0.125,
                                 portable=True)
    assert_bits_equal(got, want, f"attention {mask_kind} (reference: {REF_NAME})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_elementwise_equals_cpu(dtype: torch.dtype) -> None:
    x = torch.cat([rand((20000 if BIG else 2000,), torch.float32, 60, 40.0, device="cpu"),
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40,
                                 88.7, 89.5, -103.9, -110.0, 0.5, -0.5, 0.49,
                                 0.99999994, 1.0, -1.25, 3.8749998, 3.875, -3.875, 1e30, -1e30,
                                 2.0**-12, -0.7853982, 12345.678, 3.0e38,
                                 # within ~2^-30 of a multiple of pi/2: the hardest reductions
                                 252.89821, *torch.tensor([0x6F79BE45, 0x50A3E87F, 0x6279BE45],
                                                         dtype=torch.int32).view(torch.float32).tolist()])]).to(dtype)
    for name in cuda_backend.ELEMENTWISE_OPS:
        assert_bits_equal(cuda_backend.elementwise(name, x.to(DEV)), REF.elementwise(name, x), name)


def _pow_operands(dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) on the CPU: C99's special cases of pow (signed zeros, infinities, NaN, +-1,
    negative bases with odd, even and non-integer exponents, subnormal bases, overflow and
    underflow, y == 2) base against exponent, then ``n`` random pairs."""
    inf, nan = float("inf"), float("nan")
    bases = torch.tensor([0.0, -0.0, inf, -inf, nan, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0,
                          300.0, 1e-40, -1e-40, 1e-45, 6e-8, 1.4142135, 0.70710677, 0.99999994, 1.0000001,
                          65504.0, 1e30, -1e30, 3.0e38])
    exps = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 0.5, -0.5, 2.5, 1 / 3, 7.0, -7.0, 50.0, -50.0,
                         127.0, -149.0, 1001.0, 1e10, 16777215.0, 3e38, inf, -inf, nan])
    xs, ys = torch.meshgrid(bases, exps, indexing="ij")
    g = torch.Generator().manual_seed(80)
    k = n // 3
    wide = torch.randn(k, generator=g) * torch.exp2(torch.randint(-40, 41, (k,), generator=g).float())
    near = 1.0 + torch.randn(n - 2 * k, generator=g) * 1e-3
    x = torch.cat([xs.flatten(), wide, torch.randn(k, generator=g) * 4.0, near])
    y = torch.cat([ys.flatten(), torch.randn(k, generator=g) * 6.0, (torch.randn(k, generator=g) * 12.0).round(),
                   torch.randn(n - 2 * k, generator=g) * 2e4])
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_pow_equals_cpu(dtype: torch.dtype) -> None:
    """Pow (section 2.9) in binary64 on the GPU (div.rn.f64, cvt.rni, no fma): the bits of
    the executable specification, tensor and scalar (binary64) exponents, through the
    portable backend module."""
    from detkit.kernels import cuda_portable, spec

    x, y = _pow_operands(dtype, 3000)
    assert_bits_equal(cuda_portable.pow(x.to(DEV), y.to(DEV)), spec.pow(x, y), f"pow {dtype}, tensor exponent")
    x2, y2 = x[:1000].reshape(40, 25), y[:1000].reshape(40, 25)
    assert_bits_equal(cuda_portable.pow(x2.to(DEV).t(), y2.to(DEV).t()), spec.pow(x2.t(), y2.t()),
                      f"pow {dtype}, transposed operands")
    xs = x[:1500]
    for s in (2.0, 3.0, -3.0, 0.5, 1 / 3, 0.1, -1.5, 2.0**53 - 1, 2.0**53, 1e300, 5e-324, 0.0,
              float("inf"), float("-inf"), float("nan")):
        assert_bits_equal(cuda_portable.pow(xs.to(DEV), s), spec.pow(xs, s), f"pow {dtype}, scalar exponent {s!r}")


# ----------------------------------------------------------------------------- values, streams, front end


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariant_values_are_right(dtype: torch.dtype) -> None:
    a = rand((300, 1000), dtype, 70)
    w = rand((387, 1000), dtype, 71, 0.05)
    bias = rand((387,), dtype, 72)
    ref = a.double() @ w.double().t() + bias.double()
    got = cuda_backend.matmul(a, w.t(), bias).double()
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    scale = (a.double().abs() @ w.double().abs().t()) + bias.double().abs()
    # one rounding to the output dtype plus float32 accumulation error (loose: a wrong
    # fragment or tile index gives errors of the order of the values themselves)
    assert bool(((got - ref).abs() <= 2 * ulp * ref.abs() + 5e-5 * scale).all()), "matmul values off"
    x = rand((64, 1000), dtype, 73, 3.0)
    ref_sm = torch.softmax(x.double(), -1)
    rel = max(4 * ulp, 4e-6)  # expf, the float32 sum and the division
    assert bool(((cuda_backend.softmax(x, False).double() - ref_sm).abs() <= rel * ref_sm + 1e-7).all())
    ref_ln = torch.nn.functional.layer_norm(x.double(), (1000,), eps=1e-5)
    got_ln = cuda_backend.layer_norm(x, None, None, 1e-5).double()
    assert bool(((got_ln - ref_ln).abs() <= 8 * ulp * ref_ln.abs() + 1e-4).all())


def test_runs_on_torchs_current_stream() -> None:
    a = rand((512, 1024), torch.bfloat16, 80)
    w = rand((1024, 1024), torch.bfloat16, 81)
    want = cuda_backend.matmul(a, w.t(), None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_backend.matmul(a, w.t(), None)
        got2 = cuda_backend.softmax(got, False)  # consumes got on the same stream
    torch.cuda.current_stream().wait_stream(side)
    assert_bits_equal(got, want, "side stream")
    assert_bits_equal(got2, cuda_backend.softmax(want, False), "side stream softmax")


def test_the_kernels_under_the_mode_replay_from_a_cuda_graph() -> None:
    """Captured in a CUDA graph (as vLLM and SGLang run decode steps), a step under the mode
    replays with its eager bits: the launcher enqueues with cuLaunchKernel on torch's
    capturing stream, allocates through torch and reads nothing back from the GPU. An
    eager step first loads every kernel (loading a module is not capturable)."""
    fn = torch.nn.functional
    x, w = rand((8, 256), torch.bfloat16, 95), rand((256, 256), torch.bfloat16, 96)
    g = rand((256,), torch.bfloat16, 97)
    q, kv = rand((2, 4, 8, 64), torch.bfloat16, 98), rand((2, 4, 8, 64), torch.bfloat16, 99)

    def step() -> tuple[torch.Tensor, ...]:
        h = fn.layer_norm(fn.rms_norm(fn.linear(x, w), (256,), g, 1e-6), (256,), g, g)
        return h, torch.softmax(h.float(), -1), fn.scaled_dot_product_attention(q, kv, kv, is_causal=True)

    with batch_invariant() as bi:
        eager = step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
    routed = {"mm", "rms_norm", "layer_norm", "_softmax", "scaled_dot_product_attention"}
    assert bi.uncovered() == {} and routed <= set(bi.routed()), bi.coverage()
    for got, want, what in zip(captured, eager, ("linear, rms_norm, layer_norm", "softmax", "causal attention"),
                               strict=True):
        assert_bits_equal(got, want, f"{what} replayed from a CUDA graph")


def test_front_end_routes_cuda_tensors_and_portable_flag() -> None:
    """detkit.kernels on CUDA tensors reaches this backend and honours portable=True
    (needs ("cuda", True) -> detkit.kernels.cuda_portable in _backend.BACKEND_MODULES)."""
    from detkit import kernels
    from detkit.kernels import spec

    a = rand((3, 300), torch.bfloat16, 90, device="cpu")
    b = rand((300, 5), torch.bfloat16, 91, device="cpu")
    assert_bits_equal(kernels.matmul(a.to(DEV), b.to(DEV), portable=True), spec.matmul(a, b, None), "matmul")
    x = rand((3, 50), torch.bfloat16, 92, device="cpu")
    assert_bits_equal(kernels.softmax(x.to(DEV), portable=True), spec.softmax(x, False), "softmax")


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_convolutions_under_the_mode_on_cuda(dtype: torch.dtype, portable: bool) -> None:
    """Routed convolutions on CUDA (instead of cuDNN, whose algorithm depends on the batch
    size): Mamba's causal depthwise conv gives decode (one window) the prefill bits, every
    batch entry the bits it has alone; in portable mode a depthwise conv, a dense conv1d,
    a ViT-style conv2d and an upsampling conv_transpose1d give the CPU's portable bits."""
    import torch.nn.functional as F

    import detkit

    ch, k, length = 1536, 4, 33
    x, w, b = rand((8, ch, length), dtype, 120), rand((ch, 1, k), dtype, 121), rand((ch,), dtype, 122)
    with detkit.batch_invariant(portable=portable) as bi:
        prefill = F.conv1d(x, w, b, padding=k - 1, groups=ch)[..., :length]
        padded = F.pad(x, (k - 1, 0))
        decode = torch.stack([F.conv1d(padded[..., t : t + k], w, b, groups=ch)[..., 0] for t in range(length)], -1)
        assert_bits_equal(decode, prefill, f"depthwise conv decode vs prefill, {dtype} portable={portable}")
        for m in (1, 2, 3, 5, 7):
            assert_bits_equal(F.conv1d(x[:m], w, b, padding=k - 1, groups=ch)[..., :length], prefill[:m],
                              f"depthwise conv rows at batch {m}")
    assert bi.uncovered() == {} and bi.routed().get("convolution", 0) > 0, bi.coverage()
    if not portable:
        return
    cases = [
        (F.conv1d, x, w, b, dict(padding=k - 1, groups=ch)),
        (F.conv1d, rand((3, 80, 50), dtype, 123), rand((96, 80, 3), dtype, 124), rand((96,), dtype, 125),
         dict(padding=1, stride=2)),
        (F.conv2d, rand((2, 3, 64, 64), dtype, 126), rand((64, 3, 16, 16), dtype, 127), rand((64,), dtype, 128),
         dict(stride=16)),
        # an audio codec's upsampling (EnCodec/Mimi decoders): routed as the ordinary conv it equals
        (F.conv_transpose1d, rand((2, 64, 20), dtype, 129), rand((64, 32, 8), dtype, 136), rand((32,), dtype, 137),
         dict(stride=4, padding=2)),
    ]
    for conv, xi, wi, bi_, kw in cases:
        with detkit.batch_invariant(portable=True):
            got = conv(xi, wi, bi_, **kw)
            want = conv(xi.cpu(), wi.cpu(), bi_.cpu(), **kw)
        assert_bits_equal(got.cpu(), want, f"portable {conv.__name__} {tuple(xi.shape)} CUDA vs CPU, {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cumsum_under_the_mode_on_cuda(dtype: torch.dtype) -> None:
    """torch's CUDA scan picks its threads per row from the number of rows (ScanUtils.cuh),
    so a row's running sums can change with the batch: the negative control. Under the
    mode (either guarantee) they are the canonical ones, the CPU's portable bits."""
    import detkit

    x = rand((512, 1000), dtype, 130, 3.0)
    sizes = (1, 2, 3, 16, 64, 511)
    torch_full = torch.cumsum(x, -1)
    changed = [m for m in sizes if not torch.equal(bits(torch.cumsum(x[:m], -1)), bits(torch_full[:m]))]
    for portable in (False, True):
        with detkit.batch_invariant(portable=portable) as bi:
            full = torch.cumsum(x, -1)
            for m in sizes:
                assert_bits_equal(torch.cumsum(x[:m], -1), full[:m], f"cumsum under the mode, rows {m}")
            assert_bits_equal(x.t().cumsum(0).t(), full, "cumsum along dim 0 of the transpose")
        assert bi.uncovered() == {} and bi.routed().get("cumsum", 0) == len(sizes) + 2, bi.coverage()
        rows = x.shape[0] if BIG else 8  # fewer against the plain-Python spec (where numba is missing)
        assert_bits_equal(full[:rows].cpu(), REF.row_cumsum(x[:rows].cpu()),
                          f"cumsum portable={portable}: CUDA vs CPU portable ({REF_NAME})")
    assert changed, f"torch's CUDA cumsum gave every row its full-batch bits at rows {sizes} (negative control)"


@pytest.mark.parametrize("portable", [False, True])
def test_triangular_solve_on_cuda(portable: bool) -> None:
    """Qwen3-Next's UT systems (64 x 64 unit lower triangular, 128 right-hand columns, one
    per batch, head and chunk): every batch entry alone has its bits in the batch, the
    CPU's bits (one order for both guarantees), values close to torch's; under the mode
    torch.linalg.solve_triangular is routed."""
    import detkit

    a = rand((256, 64, 64), torch.float32, 140, 0.3) + 2.0 * torch.eye(64, device=DEV)
    b = rand((256, 64, 128), torch.float32, 141)
    for unit in (True, False):
        full = cuda_backend.solve_lower(a, b, unit, portable=portable)
        for m in (1, 2, 7, 64, 255):
            assert_bits_equal(cuda_backend.solve_lower(a[:m], b[:m], unit, portable=portable), full[:m],
                              f"solve unit={unit}, entries {m}")
        assert_bits_equal(cuda_backend.solve_lower(a, b[..., 5:6], unit, portable=portable), full[..., 5:6],
                          f"solve unit={unit}, one column")
        # columns are independent chains: the batch's first entries and columns against the
        # CPU (fewer with the plain-Python spec, where numba is missing)
        entries, cols = (8, 128) if BIG else (2, 16)
        want_cpu = REF.solve_lower(a[:entries].cpu(), b[:entries, :, :cols].cpu(), unit)
        assert_bits_equal(full[:entries, :, :cols].cpu(), want_cpu, f"solve unit={unit}: CUDA vs CPU ({REF_NAME})")
        want = torch.linalg.solve_triangular(a.double(), b.double(), upper=False, unitriangular=unit)
        # Normwise, per column: a forward substitution's error is bounded against the
        # column's largest element, not each element's own size. The unit systems here
        # grow |x| to ~140, and an element that cancels to ~0.03 then carries ~2e-5 of
        # absolute error (these are the CPU's bits: an elementwise rtol=1e-4, atol=1e-5
        # failed on one of 2^21 elements). Measured on the CPU: 1.6e-6 (torch's float32
        # trsm: 1.2e-6).
        err = (full.double() - want).abs() / want.abs().amax(-2, keepdim=True)
        assert float(err.max()) < 1e-5, f"solve unit={unit}: normwise error {float(err.max()):.3g} vs float64"
    with detkit.batch_invariant(portable=portable) as bi:
        x = torch.linalg.solve_triangular(a, b, upper=False, unitriangular=True)
    assert bi.routed() == {"linalg_solve_triangular": 1} and bi.uncovered() == {}, bi.coverage()
    assert_bits_equal(x.contiguous(), cuda_backend.solve_lower(a, b, True), "solve under the mode")


# ----------------------------------------------------------------------------- composed reductions under the mode


def _composed_inputs(rows: int, n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """tests/test_mode_reductions.py's input for each of its OPS, on the CPU: ``rows`` rows
    of ``n`` (3 x n/3 for the 2-D forms), an inf, a -inf and a NaN planted in rows 1, 2, 3."""
    from test_mode_reductions import OPS, planted_input

    return {name: planted_input(name, rows, n, dtype, seed) for name in OPS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composed_reductions_under_the_mode_are_batch_invariant_on_cuda(dtype: torch.dtype,
                                                                       request: pytest.FixtureRequest) -> None:
    """logsumexp, var/std (and var_mean/std_mean) and vector norms (F.normalize) under
    batch_invariant() are compositions of routed ops (detkit's row sum; torch's CUDA exp
    and log, position independent), so every row of 4096 (3 x 1365 for the 2-D forms) and
    every GPT-2-sized logsumexp row (50,257) has its bits alone in batches of 1 to 2048.
    torch's own CUDA sum may split a lone row over several blocks and not a big batch's
    rows (Reduce.cuh chooses from the number of outputs); how many vocabulary rows alone
    differ from a batch of 2048 under torch's logsumexp is recorded as a JUnit property,
    not asserted: not yet measured on a GPU."""
    import detkit
    from detkit.testing import assert_batch_invariant
    from test_mode_reductions import OPS, _rows

    sizes = [1, 3, 16, 257, MAX_M]
    inputs = {name: x.to(DEV) for name, x in _composed_inputs(24, 4096, dtype, 150).items()}
    vocab = _rows((16, 50257), dtype, 151).to(DEV)
    logsumexp = OPS["logsumexp"][0]
    with detkit.batch_invariant(strict=True) as bi:
        for name, (fn, _) in OPS.items():
            assert_batch_invariant(fn, inputs[name], sizes, positions="random", name=f"{name} {dtype}")
        assert_batch_invariant(logsumexp, vocab, sizes, positions="random", name=f"logsumexp of 50257, {dtype}")
    assert bi.uncovered() == {}, bi.coverage()
    # expm1 is torch's own on CUDA outside portable mode (its elementwise kernels compute
    # every element alike); on the CPU the mode aligns it
    assert {routed_as for name, (_, routed_as) in OPS.items() if name != "expm1"} <= set(bi.routed()), bi.coverage()
    assert "expm1" in bi.coverage().passed_through, bi.coverage()
    rows = vocab.shape[0]
    batch = logsumexp(vocab.repeat(MAX_M // rows, 1))[:rows]
    changed = sum(not torch.equal(bits(logsumexp(vocab[i : i + 1])), bits(batch[i : i + 1])) for i in range(rows))
    request.node.user_properties.append(
        (f"torch_logsumexp_{dtype}_vocab_rows_alone_differing_from_a_batch_of_{MAX_M}", f"{changed} of {rows}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_composed_reductions_in_portable_mode_on_cuda_are_the_cpus(dtype: torch.dtype) -> None:
    """Portable mode's logsumexp, var/std, vector norms and F.normalize on CUDA give the CPU
    portable bits for every row (4095 values: var's divisor 4094 has no exact reciprocal,
    and torch's CUDA kernel would multiply by one where its CPU kernel divides); the NaNs
    torch's own division makes in F.normalize compared as NaNs (TORCH_NAN_LAST)."""
    import detkit
    from test_mode_reductions import OPS

    inputs = _composed_inputs(8, 4095, dtype, 152)
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        results = [(name, fn(inputs[name].to(DEV)), fn(inputs[name])) for name, (fn, _) in OPS.items()]
    assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
    assert_composed_bits_equal(results, f"{dtype}: CUDA portable vs CPU portable")


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_counts_and_index_add_under_the_mode_on_cuda_are_the_cpus(dtype: torch.dtype,
                                                                      request: pytest.FixtureRequest) -> None:
    """An eager MoE loop's index_add_ (tokens x top-2 contributions into the tokens' rows):
    torch's CUDA kernel adds with atomics, in arrival order; under the mode the additions
    are made in index order, as torch's CPU kernel makes them (16-bit: 2-D along dim 0 in
    float32, rounded once; along a middle dim rounded at every addition), so the result is
    the CPU's bits, every run. histc of integer-valued expert ids counts exactly and passes
    through. How many of 20 runs of torch's own kernel differ from its first is recorded as
    a JUnit property, not asserted."""
    tokens, hidden, top_k = 512, 256, 2
    g = torch.Generator().manual_seed(170)
    index = torch.randint(0, tokens, (tokens * top_k,), generator=g)
    source = (torch.randn(tokens * top_k, hidden, generator=g) * 10).to(dtype)
    middle_source = (torch.randn(4, tokens * top_k, 8, generator=g) * 10).to(dtype)
    cpu = torch.zeros(tokens, hidden, dtype=dtype).index_add_(0, index, source)
    cpu_middle = torch.zeros(4, tokens, 8, dtype=dtype).index_add_(1, index, middle_source)
    ids = torch.randint(0, 64, (tokens * top_k,), generator=g).float()
    with batch_invariant(strict=True) as bi:
        for _ in range(3):
            got = torch.zeros(tokens, hidden, dtype=dtype, device=DEV).index_add_(0, index.to(DEV), source.to(DEV))
            assert_bits_equal(got.cpu(), cpu, f"index_add_ dim 0, {dtype}")
            got = torch.zeros(4, tokens, 8, dtype=dtype, device=DEV).index_add(1, index.to(DEV), middle_source.to(DEV))
            assert_bits_equal(got.cpu(), cpu_middle, f"index_add dim 1, {dtype}")
        counts = torch.histc(ids.to(DEV), bins=64, min=0, max=63)
    assert counts.cpu().long().tolist() == torch.bincount(ids.long(), minlength=64).tolist()
    assert bi.uncovered() == {} and bi.routed().get("index_add_") == 3 and bi.routed().get("index_add") == 3
    first = torch.zeros(tokens, hidden, dtype=dtype, device=DEV).index_add_(0, index.to(DEV), source.to(DEV))
    changed = sum(not torch.equal(bits(torch.zeros_like(first).index_add_(0, index.to(DEV), source.to(DEV))),
                                  bits(first)) for _ in range(20))
    request.node.user_properties.append((f"torch_cuda_index_add_{dtype}_runs_differing_of_20", str(changed)))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_products_under_portable_mode_on_cuda_are_the_cpus(dtype: torch.dtype) -> None:
    """Llama 4's RoPE product and a complex quotient: under batch_invariant(portable=True)
    the CUDA results are the CPU mode's bits (real IEEE operations in the same order);
    outside portable mode torch's CUDA kernel runs (every element alike) and is counted as
    passed through."""
    g = torch.Generator().manual_seed(171)
    x, freqs = torch.randn(64, 8, 32, dtype=dtype, generator=g), torch.randn(1, 8, 32, dtype=dtype, generator=g)
    y = torch.randn(64, 8, 32, dtype=dtype, generator=g)
    with batch_invariant(portable=True, strict=True) as bi:
        want = (x * freqs, x / y)
        got = ((x.to(DEV) * freqs.to(DEV)).cpu(), (x.to(DEV) / y.to(DEV)).cpu())
    for w, h, what in zip(want, got, ("product", "quotient"), strict=True):
        assert_bits_equal(torch.view_as_real(h), torch.view_as_real(w), f"complex {what}, {dtype}")
    assert bi.routed() == {"mul.Tensor": 2, "div.Tensor": 2} and bi.uncovered() == {}, bi.coverage()
    with batch_invariant(strict=True) as bi:
        x.to(DEV) * freqs.to(DEV)
    assert bi.routed() == {} and set(bi.coverage().passed_through) == {"mul.Tensor"}, bi.coverage()


@pytest.mark.parametrize("model_type", ["llava", "qwen2_5_vl", "gemma3", "glm4v"])
def test_vision_towers_on_cuda_give_each_image_its_features_in_any_batch(model_type: str,
                                                                          request: pytest.FixtureRequest) -> None:
    """tests/test_mode_vision.py's towers on the GPU: under both modes each of 5 images has
    the same features alone and in the batch of all 5, and in portable mode they are the
    CPU's portable features, bit for bit. Whether torch's own tower kept an image's
    features in the batch is recorded, not asserted."""
    import copy

    pytest.importorskip("transformers")
    import test_mode_vision as V

    model, inputs = V._tower(model_type, torch.float32)
    with torch.no_grad(), batch_invariant(portable=True):
        cpu = V._features(model, inputs(list(range(V.IMAGES))))
    gpu = copy.deepcopy(model).to(DEV)

    def features(ids: list[int]) -> list[torch.Tensor]:
        return [f.cpu() for f in V._features(gpu, {k: v.to(DEV) for k, v in inputs(ids).items()})]

    with torch.no_grad():
        request.node.user_properties.append((f"torch_cuda_{model_type}_image_0_same_in_batch_of_5", str(
            torch.equal(bits(features([0])[0]), bits(features(list(range(V.IMAGES)))[0])))))
        for portable in (False, True):
            with batch_invariant(portable=portable) as bi:
                alone = [features([i])[0] for i in range(V.IMAGES)]
                batch = features(list(range(V.IMAGES)))
            assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
            for i in range(V.IMAGES):
                assert_bits_equal(batch[i], alone[i], f"{model_type} image {i}, portable={portable}")
                if portable:
                    assert_bits_equal(alone[i], cpu[i], f"{model_type} image {i}: CUDA portable vs CPU portable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avg_pool2d_on_cuda_is_the_cpus(dtype: torch.dtype, request: pytest.FixtureRequest) -> None:
    """Gemma 3's image-token pooling (4 x 4 windows) and a padded, ceil-mode pool with NaN
    and infinities: under the mode the CUDA result is the CPU's bits (the same additions
    in the same order, one division), alike in every batch. Whether torch's own CUDA
    kernel already gave the CPU's bits is recorded, not asserted."""
    g = torch.Generator().manual_seed(172)
    x = (torch.randn(6, 64, 64, 64, generator=g) * 8).to(dtype)
    x[0, 0, 0, 0], x[1, 1, 5, 5], x[2, 2, 9, 9] = float("nan"), float("inf"), -float("inf")
    calls = [dict(kernel_size=4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)]
    torch_same = []
    for kw in calls:
        want = torch.nn.functional.avg_pool2d(x, **kw)
        torch_same.append(torch.equal(bits(torch.nn.functional.avg_pool2d(x.to(DEV), **kw).cpu()), bits(want)))
        with batch_invariant(portable=True, strict=True) as bi:
            assert_bits_equal(torch.nn.functional.avg_pool2d(x.to(DEV), **kw).cpu(), want, f"avg_pool2d {kw}")
            assert_bits_equal(torch.nn.functional.avg_pool2d(x[3:4].to(DEV), **kw).cpu(), want[3:4], "alone")
        assert bi.routed() == {"avg_pool2d": 2}, bi.coverage()
    request.node.user_properties.append((f"torch_cuda_avg_pool2d_{dtype}_equals_cpu", str(torch_same)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolation_on_cuda_is_the_cpus(dtype: torch.dtype, request: pytest.FixtureRequest) -> None:
    """Every routed interpolation (linear, bilinear small and large, bicubic, trilinear,
    grid_sample in each mode and padding, antialiased bilinear and bicubic in float32, NaN
    among the inputs): under the mode the CUDA
    result is the CPU's routed bits, in a batch and alone. Whether torch's own CUDA kernels
    gave torch's CPU bits is recorded, not asserted."""
    import test_mode_interpolation as I

    x = I._values((4, 3, 6, 8), 7, torch.float32, True).to(dtype)
    grid = I._points((4, 5, 6, 2), 8).to(dtype)
    with batch_invariant(strict=True):
        want = I._ops(x, grid)
        want_alone = I._ops(x[2:3], grid[2:3])
    torch_same = [torch.equal(bits(a.cpu()), bits(b))
                  for a, b in zip(I._ops(x.to(DEV), grid.to(DEV)), I._ops(x, grid), strict=True)]
    for portable in (False, True):
        with batch_invariant(portable=portable, strict=True) as bi:
            got = I._ops(x.to(DEV), grid.to(DEV))
            alone = I._ops(x[2:3].to(DEV), grid[2:3].to(DEV))
        assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
        for k, (g, w, a, wa) in enumerate(zip(got, want, alone, want_alone, strict=True)):
            assert_bits_equal(g.cpu(), w, f"interpolation {k}, portable={portable}: CUDA vs CPU")
            assert_bits_equal(a.cpu(), wa, f"interpolation {k} alone, portable={portable}: CUDA vs CPU")
    request.node.user_properties.append((f"torch_cuda_interpolation_{dtype}_equals_cpu", str(torch_same)))


@pytest.mark.parametrize(("model_type", "fields", "table"), [
    ("qwen2", dict(num_key_value_heads=1, head_dim=128, rope_theta=1e6), "inv_freq"),
    ("xglm", dict(d_model=1024, ffn_dim=64, max_position_embeddings=512), "embed_positions.weights"),
])
def test_tables_built_on_the_gpu_are_fixed_to_the_cpus(model_type: str, fields: dict, table: str,
                                                       request: pytest.FixtureRequest) -> None:
    """A model built on the GPU (under torch.device("cuda")) computes its tables there: the
    RoPE frequencies (Qwen2.5-7B's: head 128, base 1e6) with CUDA's pow, XGLM's sinusoidal
    positions (width 1024) with CUDA's exp, sin and cos; check_computed_buffers(fix=True)
    gives the CPU's portable tables, bit for bit. How many elements CUDA's functions
    changed is recorded as a JUnit property, not asserted."""
    transformers = pytest.importorskip("transformers")
    from detkit.buffers import check_computed_buffers

    sizes = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=2, pad_token_id=0, bos_token_id=0,
                 eos_token_id=0)
    if model_type == "qwen2":
        sizes |= dict(hidden_size=64, intermediate_size=64)
    config = transformers.AutoConfig.for_model(model_type, **(sizes | fields))
    with torch.device(DEV):
        gpu = transformers.AutoModelForCausalLM.from_config(config)
    cpu = transformers.AutoModelForCausalLM.from_config(config)
    check_computed_buffers(cpu, fix=True)
    checks = check_computed_buffers(gpu, fix=True)
    request.node.user_properties.append((f"{model_type}_table_elements_cuda_changed",
                                         str(sum(c.differing for c in checks))))
    tables = {n: b for n, b in gpu.named_buffers() if n.endswith(table)}
    assert len(tables) == (2 if model_type == "qwen2" else 1) and all(b.device.type == "cuda" for b in tables.values())
    for n, b in cpu.named_buffers():
        if n.endswith(table):
            assert_bits_equal(tables[n].cpu(), b, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_portable_composed_reductions_on_cuda_equal_cpu(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under batch_invariant(portable=True) the compositions run the CUDA portable row sum,
    elementwise and pow kernels (bfloat16 computed in float32, rounded once): each result,
    rows holding inf, -inf and NaN included, a GPT-2-sized logsumexp and a cross-entropy
    loss, is the CPU portable backend's, bit for bit (where numba is missing, the executable spec's on
    fewer values: tests/test_mode_reductions.py checks that the two agree); F.normalize's
    NaNs, which torch's own division makes, compared as NaNs (TORCH_NAN_LAST)."""
    import detkit
    from detkit.kernels import _backend
    from test_mode_reductions import OPS, _rows

    if not BIG:
        monkeypatch.setitem(_backend.BACKEND_MODULES, ("cpu", True), "detkit.kernels.spec")
    inputs = _composed_inputs(8, 4096, dtype, 152) if BIG else _composed_inputs(4, 300, dtype, 152)
    calls = [(name, fn, inputs[name]) for name, (fn, _) in OPS.items()]
    calls.append(("logsumexp of a vocabulary", OPS["logsumexp"][0],
                  _rows((4, 50257) if BIG else (1, 3000), dtype, 153)))
    labels = torch.arange(64) * 7 % 50
    labels[::5] = -100  # padding labels

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.nn.functional.cross_entropy(x, labels.to(x.device)),
                            torch.nn.functional.cross_entropy(x, labels.to(x.device), label_smoothing=0.1)])

    calls.append(("cross_entropy", loss, _rows((64, 50), dtype, 154)))
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        results = [(name, fn(x.to(DEV)), fn(x)) for name, fn, x in calls]
    assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
    assert_composed_bits_equal(results, f"{dtype}: portable, CUDA vs CPU")


# ----------------------------------------------------------------------------- the torch mode on a CUDA model

_TARGET = "Batch invariance means"
_FILLERS = ["A much longer prompt, which pads the others", "Hi", "short one", "The quick brown fox jumps", "zz",
            "Reproducible inference at temperature zero", "ok", "Left padding moves the target to the right"]


def _hf_generate(model: object, prompts: list[str], steps: int) -> torch.Tensor:
    from detkit.models import build_tokenizer

    enc = build_tokenizer()(prompts, padding=True, return_tensors="pt").to(DEV)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,  # type: ignore[attr-defined]
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mode_makes_a_cuda_model_batch_invariant(dtype: torch.dtype, attn: str, portable: bool) -> None:
    """`with detkit.batch_invariant(): model.generate(...)` on a CUDA Hugging Face model:
    the target's per-step logits alone and left padded inside batches of 2, 5 and 16 at
    several positions are bitwise equal, and no op fell back to torch."""
    _check_cuda_model_batch_invariant("tiny-llama", dtype, attn, portable)


@pytest.mark.parametrize("portable", [False, True])
def test_mode_makes_a_cuda_moe_model_batch_invariant(portable: bool) -> None:
    """The same for the MoE preset: its experts run through torch._grouped_mm, on CUDA a
    fused grouped GEMM that never reaches mm; under the mode they are detkit's products."""
    bi = _check_cuda_model_batch_invariant("tiny-mixtral", torch.bfloat16, "sdpa", portable)
    assert bi.routed().get("_grouped_mm", 0) > 0, bi.coverage()


def _check_cuda_model_batch_invariant(preset: str, dtype: torch.dtype, attn: str, portable: bool) -> batch_invariant:
    pytest.importorskip("transformers")
    import detkit
    from detkit.models import load_preset

    model = load_preset(preset, dtype=dtype, attn_implementation=attn, seed=0).to(DEV)
    steps = 8
    with detkit.batch_invariant(portable=portable) as bi:
        alone = _hf_generate(model, [_TARGET], steps)[0]
        for size, positions in ((2, (1,)), (5, (0, 3)), (16, (0, 6, 15))):
            fillers = iter(_FILLERS * 3)
            prompts = [_TARGET if i in positions else next(fillers) for i in range(size)]
            logits = _hf_generate(model, prompts, steps)
            for p in positions:
                assert_bits_equal(logits[p], alone,
                                  f"{preset}: batch {size}, position {p}, {attn} {dtype} portable={portable}")
    assert bi.uncovered() == {}, f"ops fell back to torch on CUDA:\n{bi.coverage()}"
    return bi


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_matches_sampler_on_a_cuda_model(dtype: torch.dtype) -> None:
    """RL on the GPU: the frozen sampler's incremental logits (left-padded batch) and the
    trainer's teacher-forced forward (train mode, autograd, right-padded batches of 1
    and 3) are bitwise equal under the mode; KL exactly 0."""
    pytest.importorskip("transformers")
    import detkit
    from detkit.models import build_tokenizer, load_preset
    from detkit.testing import assert_trainer_matches_sampler

    model = load_preset("tiny-llama", dtype=dtype, attn_implementation="sdpa", seed=0).to(DEV)
    with detkit.batch_invariant() as bi:
        result = assert_trainer_matches_sampler(model, [_TARGET, *_FILLERS[:4]], tokenizer=build_tokenizer(),
                                                max_new_tokens=6, trainer_batch_sizes=[1, 3])
    assert result.detail["kl_max"] == 0.0 and result.detail["mode"] == "batch-invariant"
    assert bi.uncovered() == {}, f"ops fell back to torch on CUDA:\n{bi.coverage()}"


@pytest.mark.parametrize("portable", [False, True])
def test_out_forms_under_the_mode_on_cuda(portable: bool) -> None:
    """``torch.mm(a, b, out=c)`` and the other out= overloads on CUDA under the mode: the
    functional form's bits, rows independent of M, nothing left to torch."""
    import detkit

    x = rand((300, 1000), torch.bfloat16, 96)
    w = rand((1000, 384), torch.bfloat16, 97, 0.05)
    with detkit.batch_invariant(portable=portable) as bi:
        full = torch.empty(0, dtype=x.dtype, device=DEV)
        torch.mm(x, w, out=full)
        assert_bits_equal(full, torch.mm(x, w), "mm.out vs mm")
        for m in (1, 2, 17, 64, 255):
            row = torch.empty(0, dtype=x.dtype, device=DEV)
            assert_bits_equal(torch.mm(x[:m], w, out=row), full[:m], f"mm.out rows at M={m}")
        for name, into, functional in (
            ("sum.IntList_out", lambda o: torch.sum(x, -1, out=o), lambda: torch.sum(x, -1)),
            ("_softmax.out", lambda o: torch.softmax(x, -1, out=o), lambda: torch.softmax(x, -1)),
            ("exp.out", lambda o: torch.exp(x, out=o), lambda: torch.exp(x)),
        ):
            assert_bits_equal(into(torch.empty(0, dtype=x.dtype, device=DEV)), functional(), name)
    assert bi.uncovered() == {}, f"ops fell back to torch on CUDA:\n{bi.coverage()}"


def test_probe_cli_on_a_cuda_model_under_the_mode(tmp_path: object) -> None:
    """`detkit probe --device cuda --batch-invariant` end to end: every mode matches the
    reference bit for bit (exit 0 with --fail-on-divergence) and the report names the device."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = Path(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "detkit", "probe", "--device", "cuda", "--batch-invariant",
                           "--modes", "single,padding,decode", "--batch-sizes", "1,5", "--max-new-tokens", "6",
                           "--fail-on-divergence", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["config"]["engine"]["device"] == "cuda" and report["summary"]["invariant"] is True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_portable_mode_gives_the_cpu_logits_on_the_gpu(family: str, attn: str) -> None:
    """The portable guarantee for a whole model: a small GPT-2 or Llama (RoPE's sin/cos;
    tests/portable_reference.py) under batch_invariant(portable=True) on the GPU gives, for
    a left-padded batch, the float32 logits bits committed from the CPU portable backend.
    The CPU side is a file, so this runs without numba; tests/test_mode_portable.py keeps
    the file current."""
    pytest.importorskip("transformers")
    import portable_reference as ref

    enc = ref.inputs()
    logits, uncovered = ref.portable_logits(ref.build_model(attn, family).to(DEV), enc.to(DEV))
    assert uncovered == {}, f"ops fell back to torch on CUDA, so the logits are not portable: {uncovered}"
    assert_bits_equal(ref.real_positions(logits, enc), ref.real_positions(ref.load(family)[attn], enc),
                      f"{family} {attn}: portable logits of the real tokens, CUDA vs the CPU's committed bits")


# ----------------------------------------------------------------------------- drawn shapes

_DRAWN = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_a_drawn_slice(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, data: st.DataObject,
                          what: str) -> torch.Tensor:
    """f of a drawn slice of x's rows equals those rows of f(x), bitwise; returns f(x)."""
    full = f(x)
    s = data.draw(st.integers(0, x.shape[0] - 1))
    m = data.draw(st.integers(1, x.shape[0] - s))
    assert_bits_equal(f(x[s : s + m]), full[s : s + m], f"rows {s}:{s + m} of {what}")
    return full


@_DRAWN
@given(k=st.integers(1, 700), n=st.integers(1, 300), rows=st.integers(1, 300), data=st.data(),
       dtype=st.sampled_from(DTYPES), portable=st.booleans(), kmajor=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_rows_for_drawn_shapes(k: int, n: int, rows: int, data: st.DataObject, dtype: torch.dtype,
                                      portable: bool, kmajor: bool, seed: int) -> None:
    """Any (M, K, N, B layout): every row of any slice equals that row of the full product."""
    x = rand((rows, k), dtype, seed)
    w = rand((n, k), dtype, seed + 1, 0.1)
    b = w.t() if kmajor else w.t().contiguous()
    _assert_a_drawn_slice(lambda t: cuda_backend.matmul(t, b, None, portable=portable), x, data,
                          f"M={rows} K={k} N={n}")


@_DRAWN
@given(k=st.integers(1, 700), n=st.integers(1, 300), rows=st.integers(1, 300), data=st.data(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), kmajor=st.booleans(), seed=st.integers(0, 2**16))
def test_wgmma_rows_for_drawn_shapes(k: int, n: int, rows: int, data: st.DataObject, dtype: torch.dtype,
                                     kmajor: bool, seed: int) -> None:
    """Any (M, K, N, B layout) through a drawn wgmma configuration: every row of any slice
    equals that row of the full product, and the other B layout gives the same bits."""
    cfg = data.draw(st.sampled_from(_wgmma_configs(dtype)))
    x = rand((rows, k), dtype, seed)
    w = rand((n, k), dtype, seed + 1, 0.1)
    b = w.t() if kmajor else w.t().contiguous()
    what = f"{cfg.name} M={rows} K={k} N={n} {'k' if kmajor else 'n'}-major"
    full = _assert_a_drawn_slice(lambda t: cuda_backend.matmul(t, b, None, tile=cfg), x, data, what)
    other = w.t().contiguous() if kmajor else w.t()
    assert_bits_equal(cuda_backend.matmul(x, other, None, tile=cfg), full, f"the other B layout, {what}")


@_DRAWN
@given(length=st.integers(1, 5000), rows=st.integers(1, 40), dtype=st.sampled_from(DTYPES), portable=st.booleans(),
       op=st.sampled_from(sorted(ROW_OPS)), seed=st.integers(0, 2**16), data=st.data())
def test_row_ops_for_drawn_shapes(length: int, rows: int, dtype: torch.dtype, portable: bool, op: str, seed: int,
                                  data: st.DataObject) -> None:
    """Any row length: a row alone, in place or copied to a fresh (aligned) buffer, has its bits in the batch."""
    x = rand((rows, length), dtype, seed, 3.0)
    w, b = rand((length,), dtype, seed + 1), rand((length,), dtype, seed + 2)
    fn = ROW_OPS[op]
    full = fn(x, w, b, portable)
    r = data.draw(st.integers(0, rows - 1))
    assert_bits_equal(fn(x[r : r + 1], w, b, portable), full[r : r + 1], f"{op} row {r} of {rows}x{length}")
    assert_bits_equal(fn(x[r : r + 1].clone(), w, b, portable), full[r : r + 1], f"{op} row {r} moved")


@_DRAWN
@given(lk=st.integers(1, 700), pad=st.integers(0, 200), d=st.sampled_from((64, 80, 128)), portable=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_attention_decode_and_padding_for_drawn_shapes(lk: int, pad: int, d: int, portable: bool,
                                                       dtype: torch.dtype, seed: int) -> None:
    """The last query of a causal prefill, the same query decoding against the cache, and
    the same query with `pad` masked keys in front give the same bits."""
    q = rand((1, 4, lk, d), dtype, seed)
    k, v = rand((1, 2, lk, d), dtype, seed + 1), rand((1, 2, lk, d), dtype, seed + 2)
    causal = torch.ones(lk, lk, dtype=torch.bool, device=DEV).tril().expand(1, 4, lk, lk)
    prefill = cuda_backend.attention(q, k, v, causal, 0.1, portable=portable)[:, :, -1:]
    decode = cuda_backend.attention(q[:, :, -1:], k, v, None, 0.1, portable=portable)
    assert_bits_equal(decode, prefill, f"decode vs prefill, Lk={lk}")
    kp = torch.cat([rand((1, 2, pad, d), dtype, seed + 3), k], 2)
    vp = torch.cat([rand((1, 2, pad, d), dtype, seed + 4), v], 2)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool, device=DEV),
                      torch.ones(1, lk, dtype=torch.bool, device=DEV)], 1).expand(1, 4, 1, lk + pad)
    padded = cuda_backend.attention(q[:, :, -1:], kp, vp, mask, 0.1, portable=portable)
    assert_bits_equal(padded, decode, f"left padding {pad}, Lk={lk}")
