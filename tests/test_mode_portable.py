"""Portable mode: elementwise math goes to the portable backend; logits equal across ISAs.

Under ``batch_invariant(portable=True)`` the aten functions exp, log, rsqrt, sigmoid,
silu, tanh, erf, sin, cos and gelu (both approximations; functional and in-place) are
computed by
``portable_cpu.elementwise``,
whose bits are fixed by ``detkit.kernels.spec``. The end-to-end test runs tiny Hugging
Face models in fresh processes with torch's CPU kernels forced to another instruction
set (``ATEN_CPU_CAPABILITY=default``) and numba compiling for a generic x86-64
(``NUMBA_CPU_NAME=generic``), and requires bitwise equal logits.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FAMILY_CONFIGS, isa_children
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit import _aten_adapters, mode
from detkit._reentry import set_inside
from detkit.kernels import portable_cpu, spec

FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp,
    "log": torch.log,
    "rsqrt": torch.rsqrt,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "sin": torch.sin,
    "cos": torch.cos,
    "cube": lambda t: t.pow(3.0),
    "softplus": F.softplus,
    "log1p": torch.log1p,
}
# The aten op each portable function is routed as (gelu's approximate= picks the function).
ATEN_OP = {name: {"gelu_tanh": "gelu", "cube": "pow.Tensor_Scalar"}.get(name, name) for name in FNS}
INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp_": torch.Tensor.exp_,
    "rsqrt_": torch.Tensor.rsqrt_,
    "sigmoid_": torch.Tensor.sigmoid_,
    "silu_": lambda t: F.silu(t, inplace=True),
    "tanh_": torch.Tensor.tanh_,
    "erf_": torch.Tensor.erf_,
    "gelu_": torch.ops.aten.gelu_,
    "sin_": torch.Tensor.sin_,
    "cos_": torch.Tensor.cos_,
    "cube_": lambda t: t.pow_(3),
    "log1p_": torch.Tensor.log1p_,
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 88.7, -104.0, 1e30, -1e30]


pytestmark = pytest.mark.usefixtures("mode_left_off")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _values(n: int, seed: int, dtype: torch.dtype, specials: bool) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 8
    if specials:
        k = min(n, len(SPECIALS))
        x[:k] = torch.tensor(SPECIALS[:k])
    return x.to(dtype)


def test_portable_table_matches_the_backends() -> None:
    assert _aten_adapters.ELEMENTWISE_PORTABLE | {"pow.Tensor_Scalar"} == frozenset(ATEN_OP.values())
    assert set(FNS) == set(portable_cpu.ELEMENTWISE_OPS)


@given(
    op=st.sampled_from(sorted(FNS)),
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    transpose=st.booleans(),
    specials=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_portable_mode_equals_the_spec(
    op: str, dtype: torch.dtype, rows: int, cols: int, transpose: bool, specials: bool, seed: int
) -> None:
    x = _values(rows * cols, seed, dtype, specials).reshape(rows, cols)
    if transpose:
        x = x.t()  # a non-contiguous input: the result keeps torch's layout
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = FNS[op](x)
    want = spec.elementwise(op, x.contiguous())
    assert _same_bits(got, want), f"{op} {dtype}: portable mode differs from detkit.kernels.spec"
    assert got.stride() == FNS[op](x).stride()  # torch's own layout for this input
    assert bi.routed() == {ATEN_OP[op]: 1} and bi.uncovered() == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(INPLACE))
def test_portable_mode_in_place_variants(op: str, dtype: torch.dtype) -> None:
    x = _values(300, 7, dtype, specials=True)
    want = portable_cpu.elementwise(op.removesuffix("_"), x)
    y = x.clone()
    with detkit.batch_invariant(portable=True) as bi:
        returned = INPLACE[op](y)
    assert returned.data_ptr() == y.data_ptr()
    assert _same_bits(y, want)
    assert bi.routed() == {"pow_.Scalar" if op == "cube_" else op: 1}


def test_portable_kernel_is_really_used_and_exit_restores_torch() -> None:
    # On a vectorising CPU torch's silu/exp/tanh differ from the canonical float32
    # evaluation for some of these inputs: the test sees which one ran.
    x = _values(4096, 3, torch.float32, specials=False)
    before = {op: fn(x) for op, fn in FNS.items() if op not in ("log", "rsqrt")}
    with detkit.batch_invariant(portable=True):
        inside = {op: fn(x) for op, fn in FNS.items() if op not in ("log", "rsqrt")}
    after = {op: fn(x) for op, fn in FNS.items() if op not in ("log", "rsqrt")}
    for op in before:
        assert _same_bits(inside[op], portable_cpu.elementwise(op, x))
        assert _same_bits(after[op], before[op]), f"{op}: torch's kernel is not restored after the mode"
    assert any(not _same_bits(inside[op], before[op]) for op in before), "portable results equal torch's everywhere"


def test_non_portable_mode_does_not_use_the_portable_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(device_type: str) -> Any:
        raise AssertionError("the portable backend was used outside portable mode")

    monkeypatch.setattr(_aten_adapters, "portable_backend", refuse)
    # 64-aligned and below torch's grain: the aligned path runs torch's kernel unchanged.
    x = _values(640, 5, torch.float32, specials=True).abs()
    with detkit.batch_invariant() as bi:
        got = {op: fn(x) for op, fn in FNS.items()}
    for op, fn in FNS.items():
        assert _same_bits(got[op], fn(x)), op
    assert bi.routed() == dict(Counter(ATEN_OP.values()))


def test_float64_and_unlisted_ops_keep_the_torch_path_in_portable_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(device_type: str) -> Any:
        raise AssertionError("the portable backend got an op or dtype it does not implement")

    monkeypatch.setattr(_aten_adapters, "portable_backend", refuse)
    x64 = _values(640, 9, torch.float64, specials=False)
    x32 = x64.float()
    with detkit.batch_invariant(portable=True):
        e64, s32, g32 = torch.exp(x64), F.mish(x32), F.softplus(x32, beta=2.0)
    assert _same_bits(e64.view(torch.float32), torch.exp(x64).view(torch.float32))
    assert _same_bits(s32, F.mish(x32)) and _same_bits(g32, F.softplus(x32, beta=2.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_portable_mode_routes_cumsum_to_the_canonical_order(dtype: torch.dtype) -> None:
    x = _values(300, 11, torch.float32, specials=True).reshape(10, 30).to(dtype)
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = x.cumsum(0)
    assert _same_bits(got, spec.row_cumsum(x.t().contiguous()).t().contiguous())
    assert bi.routed() == {"cumsum": 1}
    with detkit.batch_invariant(portable=True) as bi:
        x.double().cumsum(0)  # no portable float64 kernel: torch's, and counted
    assert "kernel rejected the input" in next(iter(bi.uncovered()["cumsum"]))


def test_empty_and_integer_inputs_pass_through() -> None:
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        assert torch.exp(torch.empty(0, 3)).shape == (0, 3)
    assert bi.coverage().passed_through == {"exp": {"empty input": 1}}


def test_coverage_report_in_portable_mode() -> None:
    x = torch.rand(3, 64) + 0.5
    fns = (F.silu, torch.tanh, torch.rsqrt, torch.exp, torch.sin, torch.cos, lambda t: t.pow(1.5), F.gelu,
           F.softplus, torch.log1p, F.mish, torch.sinh)
    _, ops = mode.trace_ops(lambda: [fn(x) for fn in fns])
    report = mode.coverage_report(ops, portable=True)
    for op in ("silu.default", "tanh.default", "rsqrt.default", "exp.default", "gelu.default", "sin.default",
               "cos.default", "softplus.default", "log1p.default", "pow.Tensor_Scalar"):
        assert op in report.routed and op not in report.not_portable, op
    for op in ("mish.default", "sinh.default"):
        assert op in report.not_portable, op
    # On CUDA the portable kernels are routed too; the other math-library functions are
    # not portable, and outside portable mode all of them are position independent there.
    cuda = mode.coverage_report(ops, portable=True, device="CUDA")
    assert {"silu.default", "exp.default", "tanh.default", "rsqrt.default", "gelu.default"} <= set(cuda.routed)
    assert {"mish.default", "sinh.default"} <= set(cuda.not_portable)
    plain = mode.coverage_report(ops, device="CUDA")
    assert {"silu.default", "sin.default", "gelu.default", "mish.default"} <= set(plain.exact) and not plain.uncovered


@pytest.mark.parametrize("device", ["CPU", "CUDA"])
def test_coverage_report_classifies_pow_by_its_traced_exponents(device: str) -> None:
    """RMSNorm's pow(x, 2) is one correctly rounded multiply, GPT-2's pow(x, 3) the portable
    cube: the report listed every Llama as not portable for the first. By the exponents
    trace_ops saw: exact, or routed (the portable cube, or Pow for any other exponent)."""
    x = torch.rand(3, 8) + 0.5

    def report(*exponents: float) -> mode.CoverageReport:
        return mode.coverage_report(mode.trace_ops(lambda: [x.pow(e) for e in exponents])[1], portable=True,
                                    device=device)

    squares = report(2, 0.5)
    assert "pow.Tensor_Scalar" in squares.exact and not squares.not_portable, str(squares)
    assert squares.notes["pow.Tensor_Scalar"] == "exponents 0.5, 2 (as traced): exact"
    cubes = report(2, 3)
    assert "pow.Tensor_Scalar" in cubes.routed and not cubes.not_portable, str(cubes)
    assert "portable cube" in cubes.notes["pow.Tensor_Scalar"]
    general = report(2, 1.5)
    assert "pow.Tensor_Scalar" in general.routed and not general.not_portable, str(general)
    _, ops = mode.trace_ops(lambda: x.clone().pow_(2))
    assert "pow_.Scalar" in mode.coverage_report(ops, portable=True, device=device).exact
    # counts from elsewhere (a plain mapping): by name, routed to the portable Pow
    assert "pow.Tensor_Scalar" in mode.coverage_report({"pow.Tensor_Scalar": 1}, portable=True).routed


def test_trace_ops_records_a_complex_pow_exponent_instead_of_raising() -> None:
    """The tracer took float() of every scalar exponent: z ** 2j (no float) raised a
    TypeError out of trace_ops, which traced it before exponents were recorded. A complex
    exponent is kept as such and matches no exact one (a complex pow is torch's: uncovered);
    2 + 0j is 2, as the mode's adapter compares it (exact at run time)."""
    z = (torch.rand(3, 8) + 0.5).to(torch.complex64)
    _, ops = mode.trace_ops(lambda: (z.pow(2), z.pow(2j)))
    assert ops["pow.Tensor_Scalar"] == 2
    assert "pow.Tensor_Scalar" in mode.coverage_report(ops, portable=True).uncovered
    _, ops = mode.trace_ops(lambda: (z.pow(2 + 0j), z.pow(0.5)))
    assert mode.coverage_report(ops, portable=True).notes["pow.Tensor_Scalar"] == "exponents 0.5, 2 (as traced): exact"


def test_portable_mode_reports_calls_left_to_torchs_math_library() -> None:
    """A routed elementwise call whose values come from torch's math library (mish,
    softplus with another beta, float64 exp and pow) is batch invariant but not portable:
    measured, mish's float32 bits change with ATEN_CPU_CAPABILITY. The block's
    coverage must say so, not only list it as routed."""
    x = torch.rand(3, 70) + 0.5
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        F.softplus(x), F.softplus(x, beta=2.0), F.mish(x), torch.exp(x.double()), x.double().pow(1.5)
        F.silu(x), torch.exp(x), torch.rsqrt(x.bfloat16()), x.pow(2), x.pow(1.5), F.gelu(x), torch.sin(x)  # portable, or exact
        F.softshrink(x - 1, 0.5)  # exact arithmetic, aligned only for torch's sign of zero
    assert set(bi.not_portable()) == {"softplus", "mish", "exp", "pow.Tensor_Scalar"}
    assert bi.not_portable()["mish"] == {"torch's math library (not in the canonical orders)": 1}
    assert bi.not_portable()["softplus"] == {"extra arguments: torch's math library": 1}  # beta=2.0
    assert bi.not_portable()["exp"] == {"torch.float64: torch's math library (portable kernels take float32, "
                                        "bfloat16, float16)": 1}
    assert bi.uncovered() == {}  # still batch invariant: nothing fell back
    assert "NOT portable" in str(bi.coverage()) and "mish" in bi.coverage().to_dict()["not_portable"]
    with detkit.batch_invariant() as plain:  # batch-invariant mode promises nothing across ISAs
        F.softplus(x, beta=2.0), F.mish(x)
    assert plain.not_portable() == {} and "NOT portable" not in str(plain.coverage())


def test_llama4_attention_temperature_is_portable() -> None:
    """Llama 4's attention temperature tuning, log1p(floor((positions + 1) / floor_scale)),
    was torch's libm log1p (its bits change with ATEN_CPU_CAPABILITY): now the portable
    log1p, which on these small integers is the portable Log of 1 + x (1 + x is exact)."""
    positions = torch.arange(0, 70_000, 97)
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        scales = torch.log1p(torch.floor((positions.float() + 1.0) / 8192.0)) * 0.1 + 1.0
        from_ints = torch.log1p(positions // 8192)  # an integer input: computed in float32, as torch does
    assert bi.not_portable() == {} and bi.uncovered() == {}
    assert bi.routed()["log1p"] == 2
    floors = torch.floor((positions.float() + 1.0) / 8192.0)
    assert _same_bits(scales, portable_cpu.elementwise("log", floors + 1.0) * 0.1 + 1.0)
    assert _same_bits(from_ints, portable_cpu.elementwise("log", (positions // 8192).float() + 1.0))
    _, ops = mode.trace_ops(lambda: torch.log1p(torch.floor((positions.float() + 1.0) / 8192.0)))
    report = mode.coverage_report(ops, portable=True)
    assert "log1p.default" in report.routed and not report.not_portable, str(report)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mixtral"])
def test_every_preset_runs_entirely_on_portable_kernels(preset: str) -> None:
    """RoPE's sin/cos, GPT-2's gelu_new (tanh, pow(x, 3)), SiLU, the norms, attention and the
    MoE router: nothing from torch's math library, nothing uncovered."""
    pytest.importorskip("transformers")
    from detkit.models import build_tokenizer, load_preset

    enc = build_tokenizer()(["Batch invariance means", "hi"], padding=True, return_tensors="pt")
    model = load_preset(preset, dtype=torch.float32)
    with torch.no_grad(), detkit.batch_invariant(portable=True) as bi:
        model(**enc)
    assert bi.not_portable() == {} and bi.uncovered() == {}, bi.coverage()
    assert bi.routed()


@pytest.mark.parametrize("family", ["mamba2", "qwen3_next"])
def test_chunked_scan_families_run_entirely_on_portable_kernels(family: str) -> None:
    """Mamba2's segment sums (float cumsum) and Qwen3-Next's gated delta rule (cumsum of
    the gates, linalg_solve_triangular of its UT system): the static report and the run
    under the mode find nothing left to torch but Qwen3-Next's MoE router's float histc
    (token counts: exact while they are integers below 2^24)."""
    pytest.importorskip("transformers")
    import transformers

    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                               eos_token_id=EOS_ID, **CONFIG_FAMILIES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    enc = build_tokenizer()(["Batch invariance means", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        _, traced = detkit.mode.trace_ops(model, **enc)
        with detkit.batch_invariant(portable=True) as bi:
            model(**enc)
    report = detkit.mode.coverage_report(traced, portable=True)
    assert set(report.uncovered) <= {"histc.default"} and report.not_portable == {}, str(report)
    assert bi.not_portable() == {} and bi.uncovered() == {}, bi.coverage()
    routed = {"cumsum"} | ({"linalg_solve_triangular"} if family == "qwen3_next" else set())
    assert routed <= set(bi.routed()), bi.routed()


def test_cuda_elementwise_adapters_route_only_in_portable_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA table's elementwise adapters, driven directly with a stand-in portable
    backend: portable mode computes through it (in place too), plain mode passes through."""
    from detkit import _aten_adapters as ad

    by_name = {o.name: o for o in ad.OVERRIDES["CUDA"]}
    assert {"silu", "exp", "tanh", "rsqrt", "sigmoid", "log", "erf", "gelu", "sin", "cos", "silu_", "exp_", "gelu_",
            "sin_"} <= set(by_name)
    assert "mish" not in by_name and "sinh" not in by_name
    calls: list[str] = []

    class Backend:
        @staticmethod
        def elementwise(name: str, x: torch.Tensor) -> torch.Tensor:
            calls.append(name)
            return torch.full_like(x, 7.0)

        @staticmethod
        def pow(x: torch.Tensor, y: torch.Tensor | float) -> torch.Tensor:  # noqa: A003 - the backend's name
            calls.append(f"pow {y if isinstance(y, float) else tuple(y.shape)}")
            return torch.full_like(x, 5.0)

    monkeypatch.setattr(ad, "portable_backend", lambda device_type: Backend)
    x = torch.rand(3, 5)
    original = lambda *a, **k: pytest.fail("the portable route must not call torch's kernel")  # noqa: E731
    out = by_name["silu"].adapter(ad.Call(True, original), x)
    assert calls == ["silu"] and bool((out == 7.0).all()) and bool((x != 7.0).all())
    y = x.clone()
    assert by_name["exp_"].adapter(ad.Call(True, original), y) is y and bool((y == 7.0).all())
    by_name["gelu"].adapter(ad.Call(True, original), x, approximate="tanh")
    by_name["gelu"].adapter(ad.Call(True, original), x)
    assert calls == ["silu", "exp", "gelu_tanh", "gelu"]
    by_name["pow.Tensor_Scalar"].adapter(ad.Call(True, original), x, 3)
    assert calls[-1] == "cube"
    # any other exponent, and a tensor one, or a scalar base: the portable Pow
    assert bool((by_name["pow.Tensor_Scalar"].adapter(ad.Call(True, original), x, 1.5) == 5.0).all())
    by_name["pow.Tensor_Tensor"].adapter(ad.Call(True, original), x, x[0])
    by_name["pow.Scalar"].adapter(ad.Call(True, original), 2.0, x)
    assert calls[-3:] == ["pow 1.5", "pow (3, 5)", "pow (3, 5)"]
    for name, args in (("pow.Tensor_Scalar", (x, 1.5)), ("pow.Tensor_Scalar", (x, 3.0)), ("pow.Tensor_Tensor", (x, x)),
                       ("pow.Scalar", (2.0, x))):  # plain mode: torch's CUDA pow is position independent
        with pytest.raises(ad.Unsupported, match="position independent"):
            by_name[name].adapter(ad.Call(False, original), *args)
    with pytest.raises(ad.Unsupported, match="position independent") as why:
        by_name["silu"].adapter(ad.Call(False, original), x)
    assert why.value.benign


POW_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # ALiBi slopes: pow.Tensor_Tensor (Bloom, Falcon), pow.Scalar (MPT)
    "bloom": ("BloomConfig", TINY_FAMILY_CONFIGS["bloom"]),
    "falcon-alibi": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                                          new_decoder_architecture=False)),
    "mpt": ("MptConfig", dict(d_model=64, n_layers=2, n_heads=4)),
    # dynamic NTK RoPE recomputes inv_freq = base ** (arange / dim) once past 16 positions
    "llama-dynamic-rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=16,
                                               rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 10000.0})),
}


@pytest.mark.parametrize("name", list(POW_FAMILIES))
def test_pow_families_run_entirely_on_portable_kernels(name: str) -> None:
    """Their pow (ALiBi's slopes, dynamic RoPE's frequencies) came from torch's math
    library, so portable mode listed them as not portable; now it is the portable Pow,
    and greedy generation takes nothing from torch's math library and leaves nothing
    uncovered."""
    transformers = pytest.importorskip("transformers")
    from detkit.models import VOCAB_SIZE

    cls, fields = POW_FAMILIES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(vocab_size=VOCAB_SIZE,
                                                                                        **fields)).eval()
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]])
    with torch.no_grad(), warnings.catch_warnings(), detkit.batch_invariant(portable=True) as bi:
        warnings.simplefilter("ignore")  # past the tiny Llama's 16 positions: the dynamic RoPE's point
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert bi.routed().get("pow.Tensor_Tensor", 0) + bi.routed().get("pow.Scalar", 0) > 0, bi.coverage()
    assert bi.not_portable() == {} and bi.uncovered() == {}, bi.coverage()


# Complex RoPE (freqs_cis from torch.polar, applied as a complex product), Llama 4's
# attention temperature (log1p) on its NoPE layers, DeepSeek-V2's MoE router (histc of floats).
COMPLEX_ROPE_FAMILIES: dict[str, dict[str, Any]] = {
    "llama4_text": dict(hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        no_rope_layers=[1, 1, 1, 0], attn_temperature_tuning=True, floor_scale=2),
    "deepseek_v2": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        first_k_dense_replace=1),
}


@pytest.mark.parametrize("family", sorted(COMPLEX_ROPE_FAMILIES))
def test_complex_rope_families_take_nothing_from_torchs_math_library(family: str) -> None:
    """Tiny Llama 4 and DeepSeek-V2: polar (their freqs_cis) and log1p (Llama 4's attention
    temperature) are portable and RoPE's complex product is routed, so a portable-mode
    generate takes nothing from torch's math library; what coverage_report may still list
    is DeepSeek-V2's router histc of float counts (exact while they are integers below
    2^24, checked as traced)."""
    transformers = pytest.importorskip("transformers")
    from detkit.models import VOCAB_SIZE

    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB_SIZE, **COMPLEX_ROPE_FAMILIES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        _, ops = mode.trace_ops(model, ids)
    report = mode.coverage_report(ops, portable=True)
    assert {"polar.default", "mul.Tensor"} <= set(report.routed) and report.not_portable == {}, str(report)
    assert set(report.uncovered) <= {"histc.default"} and "complex" in report.notes["mul.Tensor"], str(report)
    if family == "llama4_text":
        assert "log1p.default" in report.routed, str(report)
    with torch.no_grad(), warnings.catch_warnings(), detkit.batch_invariant(portable=True) as bi:
        warnings.simplefilter("ignore")
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert bi.not_portable() == {} and bi.uncovered() == {} and bi.routed()["mul.Tensor"] > 0, bi.coverage()


def test_polar_is_built_from_the_routed_cos_and_sin() -> None:
    """torch.polar (Llama 4's and DeepSeek-V2's freqs_cis) calls its math library's cos
    and sin. Under portable mode it is ``abs * Cos(angle) + i * abs * Sin(angle)`` from the
    portable kernels, bit for bit (out= too); outside it, torch's values within rounding.
    Arguments torch's CPU polar refuses (float16 there) keep torch's error."""
    g = torch.Generator().manual_seed(15)
    radius, angle = torch.rand(9, 64, generator=g), torch.randn(9, 64, generator=g) * 100
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = torch.polar(radius, angle)
        into = torch.polar(radius, angle, out=torch.empty(0, dtype=got.dtype))
    assert bi.not_portable() == {} and {"polar", "polar.out", "cos", "sin"} <= set(bi.routed()), bi.coverage()
    want = torch.complex(radius * portable_cpu.elementwise("cos", angle), radius * portable_cpu.elementwise("sin", angle))
    assert torch.equal(torch.view_as_real(got), torch.view_as_real(want))
    assert torch.equal(torch.view_as_real(into), torch.view_as_real(want))
    with detkit.batch_invariant(strict=True):
        plain = torch.polar(radius, angle)
        with pytest.raises(NotImplementedError, match="Half"):
            torch.polar(radius.half(), angle.half())
    torch.testing.assert_close(plain, torch.polar(radius, angle), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- across ISAs

PRESETS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2")
# Families built from their configs whose portability rests on today's portable functions:
# Gemma's tanh gelu, GPT-NeoX's erf gelu, Mamba's softplus (its dt), Llama 4's complex RoPE
# (polar's portable cos and sin, the routed complex product), Mamba2's chunked scan
# (routed float cumsum; chunks of 8 tokens, so the prompts span several), Qwen3-Next's gated
# delta rule (cumsum and linalg_solve_triangular), Bloom's ALiBi slopes (pow). With those from
# torch's math library, tiny Gemma's and tiny Mamba's portable-mode logits changed under
# ATEN_CPU_CAPABILITY=default on this AVX-512 machine.
CONFIG_FAMILIES: dict[str, dict[str, Any]] = {
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh"),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     hidden_act="gelu"),
    "mamba": dict(hidden_size=64, state_size=16, num_hidden_layers=2, use_mambapy=False),
    # RoPE as a complex product (routed: torch's scalar path fuses multiply-adds)
    "llama4_text": dict(COMPLEX_ROPE_FAMILIES["llama4_text"], num_hidden_layers=2, no_rope_layers=[1, 0]),
    # Qwen2.5-7B's RoPE table (head 128, base 1e6): torch's pow gave one element of 64 other
    # bits under ATEN_CPU_CAPABILITY=default when the model was built (detkit.buffers)
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=128, rope_theta=1e6),
    **TINY_FAMILY_CONFIGS,
}
# one run: transformers refuses attn_implementation="sdpa" for these
NO_ATTENTION = frozenset({"mamba", "mamba2", "bloom"})
MODEL_RUNS = [(name, attn) for name in (*PRESETS, *CONFIG_FAMILIES) for attn in ("eager", "sdpa")
              if not (name in NO_ATTENTION and attn == "sdpa")]

# Run in a fresh process: the model's forward logits (and every module's output) hashed,
# with the mode off and under portable mode. The weights come from the parent process,
# because the seeded initialisation itself (torch's vectorised normal_) differs per ISA.
_CHILD = r"""
import hashlib, json, sys
import torch, transformers, detkit
from detkit.models import build_tokenizer, load_preset

def h(t):
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

weights_dir, presets, families = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
no_attention = set(sys.argv[4].split(","))
enc = build_tokenizer()(["Batch invariance means", "hi", "The quick brown fox"], padding=True, return_tensors="pt")
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name in presets + list(families):
    for attn in ("eager",) if name in no_attention else ("eager", "sdpa"):
        if name in families:
            config = transformers.AutoConfig.for_model(name, **families[name], attn_implementation=attn)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
        else:
            model = load_preset(name, dtype=torch.float32, attn_implementation=attn)
        model.load_state_dict(torch.load(f"{weights_dir}/{name}.pt"))
        detkit.check_computed_buffers(model, fix=True)  # built by torch's pow, which differs per ISA
        seen = {}
        def hook(module, args, output, name=None):
            t = output if isinstance(output, torch.Tensor) else (output[0] if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) else None)
            if t is not None and name not in seen:
                seen[name] = h(t)
        for mname, module in model.named_modules():
            module.register_forward_hook(lambda m, a, o, mname=mname: hook(m, a, o, mname))
        with torch.no_grad():
            off = h(model(**enc).logits)
            seen.clear()
            with detkit.batch_invariant(portable=True):
                logits = model(**enc).logits
        out[f"{name}/{attn}"] = {"off": off, "portable": h(logits), "modules": dict(seen)}
print(json.dumps(out))
"""

_ENVS: dict[str, dict[str, str]] = {
    "host": {},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "NUMBA_CPU_NAME=generic": {"NUMBA_CPU_NAME": "generic"},
    # oneDNN's own dispatch (torch's CPU convolutions): its SSE4.1 kernels changed tiny
    # Mamba's conv, so its portable-mode logits, until convolutions were routed.
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
}


@pytest.fixture(scope="module")
def isa_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    transformers = pytest.importorskip("transformers")
    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, load_preset

    weights = tmp_path_factory.mktemp("weights")
    for name in PRESETS:
        torch.save(load_preset(name, dtype=torch.float32).state_dict(), weights / f"{name}.pt")
    common = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  initializer_range=0.1)  # as the presets: varied logits, not one repeated token
    families = {name: dict(common, **fields) for name, fields in CONFIG_FAMILIES.items()}
    for name, fields in families.items():
        config = transformers.AutoConfig.for_model(name, **fields)
        torch.save(transformers.AutoModelForCausalLM.from_config(config).state_dict(), weights / f"{name}.pt")
    return isa_children(_CHILD, [str(weights), ",".join(PRESETS), json.dumps(families), ",".join(sorted(NO_ATTENTION))],
                        _ENVS)


def _first_difference(a: dict[str, str], b: dict[str, str]) -> str:
    return next((m or "<model>" for m in a if a[m] != b.get(m)), "none")


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "attn"), MODEL_RUNS)
@pytest.mark.parametrize("other", [k for k in _ENVS if k != "host"])
def test_portable_logits_are_identical_across_instruction_sets(
    isa_runs: dict[str, dict[str, Any]], preset: str, attn: str, other: str
) -> None:
    host, alt = isa_runs["host"][f"{preset}/{attn}"], isa_runs[other][f"{preset}/{attn}"]
    assert host["portable"] == alt["portable"], (
        f"{preset}/{attn}: portable-mode logits differ under {other}; first module whose output "
        f"differs: {_first_difference(host['modules'], alt['modules'])}"
    )


@pytest.mark.slow
def test_instruction_set_switch_changes_torch_results(isa_runs: dict[str, dict[str, Any]]) -> None:
    # Negative control: without the mode, forcing torch's scalar kernels changes the
    # logits (silu/sigmoid round differently), so the test above can fail.
    if isa_runs["host"]["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs torch's DEFAULT kernels; nothing to compare")
    alt = isa_runs["ATEN_CPU_CAPABILITY=default"]
    assert alt["capability"] == "DEFAULT"
    assert isa_runs["host"]["tiny-llama/eager"]["off"] != alt["tiny-llama/eager"]["off"]
    assert isa_runs["host"]["gemma/eager"]["off"] != alt["gemma/eager"]["off"]
    assert isa_runs["host"]["mamba/eager"]["off"] != alt["mamba/eager"]["off"]


@pytest.mark.slow
def test_onednn_instruction_set_switch_changes_torchs_convolution(isa_runs: dict[str, dict[str, Any]]) -> None:
    # Negative control for the oneDNN run: torch's conv (Mamba's causal conv1d) changes
    # with oneDNN's instruction set, so the portable logits above could differ there.
    if isa_runs["host"]["capability"] == "DEFAULT":
        pytest.skip("this CPU has no AVX2: oneDNN may already run its SSE4.1 kernels; nothing to compare")
    host, alt = isa_runs["host"]["mamba/eager"], isa_runs["ONEDNN_MAX_CPU_ISA=SSE41"]["mamba/eager"]
    assert host["off"] != alt["off"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_committed_portable_logits_are_current(family: str, attn: str) -> None:
    """tests/data/portable-{gpt2,llama}-logits.npz are what the GPU test compares CUDA
    against: they must be the bits this CPU's portable backend gives now (regenerate with
    `python tests/portable_reference.py` only if the canonical orders changed on purpose)."""
    pytest.importorskip("transformers")
    import portable_reference as ref

    enc = ref.inputs()
    with detkit.batch_invariant(portable=True) as bi, torch.no_grad():
        logits = ref.build_model(attn, family)(**enc).logits
    assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
    want = ref.load(family)[attn]
    got, want_real = ref.real_positions(logits, enc), ref.real_positions(want, enc)
    differ = int((got.view(torch.int32) != want_real.view(torch.int32)).sum())
    assert differ == 0, (f"{family} {attn}: {differ} of {want_real.numel()} committed portable logits differ from "
                         "this run; if the canonical orders changed on purpose, run `python tests/portable_reference.py`")
    # The padded batch is no degenerate case: real spread, every prompt's logits distinct.
    assert float(want.std()) > 0.1 and not torch.equal(want[0, -1], want[1, -1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_portable_reference_weights_come_from_integer_hashing(family: str) -> None:
    """The weights (and Llama's RoPE frequencies) are fixed by splitmix64 and IEEE
    operations, not by torch's RNG or its pow, so a GPU machine (any CPU) rebuilds the same
    model: a torch seed change leaves them alone."""
    pytest.importorskip("transformers")
    import portable_reference as ref

    def tensors() -> dict[str, torch.Tensor]:
        model = ref.build_model("eager", family)
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    torch.manual_seed(1)
    a = tensors()
    torch.manual_seed(2)
    b = tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if family == "llama":
        assert torch.equal(a["model.rotary_emb.inv_freq"], torch.tensor([4.0 ** -i for i in range(8)]))
    # splitmix64's first outputs (seed 0), as published with the algorithm, top 12 bits.
    assert ref._hashed_ints(2, 0).tolist() == [(0xE220A8397B1DCDAF >> 52) - 2048, (0x6E789E6AA1B965F4 >> 52) - 2048]


def test_coverage_report_lists_float64_calls_as_the_run_counts_them() -> None:
    """The portable kernels take float32, bfloat16 and float16: a float64 matmul, softmax,
    norm, sum or cumsum falls back to torch at run time (uncovered) and a float64 silu or
    pow is torch's math library (not portable). The static report listed them all as
    routed; trace_ops now records which ops computed in float64 (a sum's dtype= too)."""
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)

    def run() -> None:
        x @ w, torch.softmax(x, -1), F.layer_norm(x, (8,)), x.cumsum(-1), F.silu(x), x.pow(1.5)
        x.float().sum(-1, dtype=torch.float64)
        x.float() @ w.float(), F.silu(x.float())  # float32: routed and portable

    with detkit.batch_invariant(portable=True) as bi:
        run()
    _, ops = mode.trace_ops(run)
    static = mode.coverage_report(ops, portable=True)
    full = lambda names: {n if "." in n else f"{n}.default" for n in names}  # noqa: E731
    assert set(static.uncovered) == full(bi.uncovered()) == {"mm.default", "_softmax.default",
                                                             "native_layer_norm.default", "cumsum.default",
                                                             "sum.dim_IntList"}, str(static)
    assert set(static.not_portable) == full(bi.not_portable()) == {"silu.default", "pow.Tensor_Scalar"}, str(static)
    assert "float64 operands (as traced)" in static.notes["mm.default"]
    # Outside portable mode the CPU kernels take float64: all routed, as at run time.
    assert mode.coverage_report(ops).uncovered == {}


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in float32 ULPs of the exact value (float64)."""
    rounded = exact.float().abs()
    ulp = (torch.nextafter(rounded, torch.tensor(math.inf)) - rounded).double()
    return (got.double() - exact).abs() / ulp


def test_portable_expm1_is_within_2_5_ulp_and_keeps_the_special_values() -> None:
    """Apertus' xIELU calls expm1, which the portable backends have no kernel for: in
    portable mode it is Kahan's composition of the portable exp and log. Measured: within
    2.4 float32 ULPs of the exact value (float64) over wide and tiny inputs up to exp's
    overflow; bfloat16 correctly rounded on these samples. -0.0, the tiny inputs (expm1(x) =
    x), -inf (-1), +inf, the overflow threshold and NaN (the canonical one) are right."""
    rng = np.random.default_rng(40)
    spread = [rng.standard_normal(20000) * s for s in (1e-9, 1e-5, 1e-2, 0.3, 1, 5, 30)]
    x = torch.from_numpy(np.concatenate([*spread, rng.uniform(-104, 88.7, 20000)])).float()
    exact = torch.from_numpy(np.expm1(x.double().numpy()))
    with detkit.batch_invariant(portable=True, strict=True) as bi:
        got = torch.expm1(x)
        got16 = torch.expm1(x.bfloat16())
        specials = torch.expm1(torch.tensor([-0.0, 1e-30, -math.inf, math.inf, 88.72, 88.73, math.nan]))
    assert bi.not_portable() == {} and bi.routed()["expm1"] == 3
    finite = exact.float().isfinite()
    assert bool((got[~finite] == math.inf).all())  # past the overflow threshold
    assert float(_ulps(got[finite], exact[finite]).max()) <= 2.5
    exact16 = torch.from_numpy(np.expm1(x.bfloat16().double().numpy())).bfloat16()
    assert float((got16 != exact16).float().mean()) <= 1e-3
    assert math.copysign(1, float(specials[0])) == -1 and specials[1] == 1e-30 and specials[2] == -1
    assert specials[3] == math.inf and math.isfinite(float(specials[4])) and specials[5] == math.inf
    assert specials[6:].view(torch.int32).item() == 0x7FC00000


def test_portable_expm1_in_the_coverage_report_and_the_cuda_table() -> None:
    """expm1 is routed, and portable, on both devices; the CUDA adapter composes in
    portable mode (driven here on CPU tensors, inside the mode, as the mode calls it) and
    passes torch's CUDA kernel through otherwise (position independent)."""
    x = torch.rand(3, 8)
    _, ops = mode.trace_ops(lambda: torch.expm1(x))
    for device in ("CPU", "CUDA"):
        report = mode.coverage_report(ops, portable=True, device=device)
        assert "expm1.default" in report.routed and not report.not_portable, str(report)
    by_name = {o.name: o for o in _aten_adapters.OVERRIDES["CUDA"]}
    assert {"expm1", "expm1_"} <= set(by_name)
    fail = lambda *a, **k: pytest.fail("the portable composition must not call torch's kernel")  # noqa: E731
    with pytest.raises(_aten_adapters.Unsupported, match="position independent"):
        by_name["expm1"].adapter(_aten_adapters.Call(False, fail), x)
    with detkit.batch_invariant(portable=True, strict=True):
        want = torch.expm1(x)
        set_inside(True)  # as the mode calls an adapter
        try:
            got = by_name["expm1"].adapter(_aten_adapters.Call(True, fail), x)
            y = x.clone()
            assert by_name["expm1_"].adapter(_aten_adapters.Call(True, fail), y) is y
        finally:
            set_inside(False)
    assert torch.equal(got, want) and torch.equal(y, want)
