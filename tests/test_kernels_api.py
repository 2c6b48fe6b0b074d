"""Bad input to ``detkit.kernels``: clear errors, empty results like torch, NaN/Inf propagation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit import kernels
from detkit.errors import BackendUnavailable, InputError
from detkit.kernels import _backend


def x32(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "call",
    [
        lambda: kernels.matmul(torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64)),
        lambda: kernels.softmax(torch.arange(5)),
        lambda: kernels.log_softmax(torch.ones(3, dtype=torch.bool)),
        lambda: kernels.rms_norm(torch.ones(2, 3, dtype=torch.int32)),
        lambda: kernels.layer_norm(torch.ones(2, 3, dtype=torch.uint8)),
        lambda: kernels.sum(torch.ones(2, 3, dtype=torch.int16)),
        lambda: kernels.mean(torch.ones(2, 3, dtype=torch.complex64)),
        lambda: kernels.cumsum(torch.ones(2, 3, dtype=torch.int64)),
        lambda: kernels.attention(torch.ones(1, 2, 4, dtype=torch.int64), x32(1, 2, 4), x32(1, 2, 4)),
    ],
)
def test_integer_bool_complex_tensors_are_rejected(call: object) -> None:
    with pytest.raises(InputError, match="float32, bfloat16, float16 or float64"):
        call()  # type: ignore[operator]


def test_non_tensor_is_rejected() -> None:
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        kernels.matmul([[1.0]], x32(1, 1))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        kernels.softmax(3.0)  # type: ignore[arg-type]


def test_dtype_mismatch() -> None:
    with pytest.raises(InputError, match="same dtype"):
        kernels.matmul(x32(2, 3), x32(3, 4).double())
    with pytest.raises(InputError, match="same dtype"):
        kernels.matmul(x32(2, 3), x32(3, 4), x32(4).bfloat16())
    with pytest.raises(InputError, match="same dtype"):
        kernels.rms_norm(x32(2, 3), x32(3).half())
    with pytest.raises(InputError, match="same dtype"):
        kernels.attention(x32(1, 2, 4), x32(1, 2, 4).bfloat16(), x32(1, 2, 4))


def test_shape_mismatch_messages_name_the_shapes() -> None:
    with pytest.raises(InputError, match=r"\(2, 3\) and \(4, 5\)"):
        kernels.matmul(x32(2, 3), x32(4, 5))
    with pytest.raises(InputError, match="do not broadcast"):
        kernels.matmul(x32(2, 3, 4), x32(3, 4, 5))
    with pytest.raises(InputError, match="bias"):
        kernels.matmul(x32(2, 3), x32(3, 4), x32(5))
    with pytest.raises(InputError, match="at least 1 dimension"):
        kernels.matmul(torch.tensor(2.0), x32(3))
    with pytest.raises(InputError, match=r"weight must have shape \(3,\)"):
        kernels.rms_norm(x32(2, 3), x32(4))
    with pytest.raises(InputError, match=r"bias must have shape \(3,\)"):
        kernels.layer_norm(x32(2, 3), None, x32(2, 3))
    with pytest.raises(InputError, match="out of range"):
        kernels.softmax(x32(2, 3), dim=2)
    with pytest.raises(InputError, match="one int"):
        kernels.sum(x32(2, 3), dim=(0, 1))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="eps"):
        kernels.rms_norm(x32(2, 3), eps=-1.0)
    with pytest.raises(InputError, match="eps"):
        kernels.layer_norm(x32(2, 3), eps=math.nan)


def test_attention_argument_errors() -> None:
    q, k, v = x32(1, 4, 3, 8), x32(1, 2, 5, 8), x32(1, 2, 5, 8)
    with pytest.raises(InputError, match="enable_gqa=True"):
        kernels.attention(q, k, v)
    with pytest.raises(InputError, match="multiple"):
        kernels.attention(q, x32(1, 3, 5, 8), x32(1, 3, 5, 8), enable_gqa=True)
    with pytest.raises(InputError, match="not both"):
        kernels.attention(q, k, v, attn_mask=torch.ones(3, 5, dtype=torch.bool), is_causal=True, enable_gqa=True)
    with pytest.raises(InputError, match="last dimension"):
        kernels.attention(q, x32(1, 2, 5, 7), v, enable_gqa=True)
    with pytest.raises(InputError, match="sequence length"):
        kernels.attention(q, k, x32(1, 2, 6, 8), enable_gqa=True)
    with pytest.raises(InputError, match="does not broadcast"):
        kernels.attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(InputError, match="same number"):
        kernels.attention(x32(3, 8), k, v)
    for scale in ("x", float("nan"), float("inf"), True):
        with pytest.raises(InputError, match="scale must be a finite number"):
            kernels.attention(q, k, v, scale=scale, enable_gqa=True)  # type: ignore[arg-type]
    np = pytest.importorskip("numpy")
    kernels.attention(q, k, v, scale=np.float32(0.5), enable_gqa=True)
    # a float64 mask for a float32 query would be rounded silently: SDPA refuses it too
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(InputError, match="float32 or q's dtype"):
            kernels.attention(q, k, v, attn_mask=torch.zeros(3, 5, dtype=dtype), enable_gqa=True)


def test_grouped_matmul_argument_errors() -> None:
    x, w = x32(6, 4), x32(2, 4, 3)
    ends = torch.tensor([2, 6], dtype=torch.int32)
    cases = [
        ((x, w, ends.long()), "offs must be a 1-D int32 tensor"),
        ((x, w, [2, 6]), "offs must be a 1-D int32 tensor of group ends, got list"),
        ((x, w, ends[None]), "offs must be a 1-D int32 tensor"),
        ((x, w, ends[:1]), r"one end per group of b \(2\), got 1"),
        ((x, x32(2, 5, 3), ends), r"a's K \(4\) must equal b's second dimension \(5\)"),
        ((x[None], w, ends), r"a must be 2-D \(S, K\) and b 3-D \(G, K, N\)"),
        ((x, w.bfloat16(), ends), "same dtype"),
        ((x, w, torch.tensor([4, 2], dtype=torch.int32)), r"offs \[4, 2\] are not nondecreasing"),
        ((x, w, torch.tensor([2, 7], dtype=torch.int32)), r"within the grouped dimension \(6\)"),
        ((x, w, torch.tensor([-1, 6], dtype=torch.int32)), "not nondecreasing"),
        ((x, x32(0, 4, 3), torch.zeros(0, dtype=torch.int32)), r"at least one group \(G >= 1\), got shape \(0, 4, 3\)"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            kernels.grouped_matmul(*args)  # type: ignore[arg-type]
    # the CPU backends read the offsets on the host, so they check them even when told not to
    with pytest.raises(InputError, match="not nondecreasing"):
        kernels.grouped_matmul(x, w, torch.tensor([4, 2], dtype=torch.int32), check_offsets=False)
    # ... also when the product is empty (no row, no column or no K), which never reaches a backend
    bad = torch.tensor([5, 1], dtype=torch.int32)
    for args in ((x[:, :0], x32(2, 0, 3)), (x, x32(2, 4, 0)), (x[:0], w)):
        with pytest.raises(InputError, match="not nondecreasing"):
            kernels.grouped_matmul(*args, bad, check_offsets=False)
    with pytest.raises(InputError, match="check_offsets must be True or False"):
        kernels.grouped_matmul(x, w, ends, check_offsets="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("portable", [False, True])
def test_grouped_matmul_empty_dimensions(portable: bool) -> None:
    ends = torch.tensor([0, 0], dtype=torch.int32)
    assert kernels.grouped_matmul(x32(0, 4), x32(2, 4, 3), ends, portable=portable).shape == (0, 3)
    full = torch.tensor([1, 2], dtype=torch.int32)
    assert kernels.grouped_matmul(x32(2, 4), x32(2, 4, 0), full, portable=portable).shape == (2, 0)
    assert torch.equal(kernels.grouped_matmul(x32(2, 0), x32(2, 0, 3), full, portable=portable), torch.zeros(2, 3))
    # every row in no group: all zero, as the rows past offs[-1] always are
    assert torch.equal(kernels.grouped_matmul(x32(3, 4), x32(2, 4, 3), ends, portable=portable), torch.zeros(3, 3))


def test_unknown_device_and_missing_backend() -> None:
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(BackendUnavailable, match="meta"):
        kernels.softmax(meta)
    with pytest.raises(InputError, match="same device"):
        kernels.matmul(x32(2, 3), torch.empty(3, 4, device="meta"))


def test_missing_cuda_backend_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CUDA tensor cannot be made on this machine; the dispatch path is what matters.
    monkeypatch.setitem(_backend.BACKEND_MODULES, ("cuda", False), "detkit.kernels._no_such_backend")
    with pytest.raises(BackendUnavailable, match="not available"):
        _backend.backend_for("cuda", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_dimensions_like_torch(dtype: torch.dtype) -> None:
    e = torch.empty(0, 5, dtype=dtype)
    assert kernels.matmul(e, torch.ones(5, 3, dtype=dtype)).shape == (0, 3)
    assert kernels.matmul(torch.ones(2, 5, dtype=dtype), torch.ones(5, 0, dtype=dtype)).shape == (2, 0)
    zk = kernels.matmul(torch.ones(2, 0, dtype=dtype), torch.ones(0, 3, dtype=dtype), torch.ones(3, dtype=dtype))
    assert torch.equal(zk, torch.addmm(torch.ones(3, dtype=dtype), torch.ones(2, 0, dtype=dtype), torch.ones(0, 3, dtype=dtype)))
    assert kernels.matmul(torch.ones(0, 2, 5, dtype=dtype), torch.ones(0, 5, 3, dtype=dtype)).shape == (0, 2, 3)
    assert kernels.softmax(e).shape == (0, 5)
    assert kernels.softmax(torch.empty(3, 0, dtype=dtype)).shape == (3, 0)
    assert kernels.rms_norm(e).shape == (0, 5)
    assert kernels.layer_norm(torch.empty(2, 0, dtype=dtype)).shape == (2, 0)
    assert torch.equal(kernels.sum(torch.empty(3, 0, dtype=dtype)), torch.zeros(3, dtype=dtype))
    assert torch.isnan(kernels.mean(torch.empty(3, 0, dtype=dtype))).all()
    assert kernels.sum(e, dim=1).shape == (0,)
    assert kernels.sum(e, dim=0, keepdim=True).shape == (1, 5)
    q = torch.ones(1, 2, 0, 4, dtype=dtype)
    kv = torch.ones(1, 2, 3, 4, dtype=dtype)
    assert kernels.attention(q, kv, kv).shape == (1, 2, 0, 4)
    no_keys = torch.ones(1, 2, 0, 4, dtype=dtype)
    qq = torch.ones(1, 2, 3, 4, dtype=dtype)
    assert torch.equal(kernels.attention(qq, no_keys, no_keys), F.scaled_dot_product_attention(qq, no_keys, no_keys))


@pytest.mark.parametrize(("dtype", "ints", "neg_nan"), [(torch.float32, torch.int32, -0x00400000),
                                                        (torch.bfloat16, torch.int16, -0x0040),
                                                        (torch.float16, torch.int16, -0x0200)])
def test_portable_matmul_with_k_zero_keeps_the_output_step(dtype: torch.dtype, ints: torch.dtype,
                                                           neg_nan: int) -> None:
    # K == 0: acc = +0, acc + bias, then Out: NaN is the canonical quiet NaN whatever the
    # bias's NaN bits (x86 keeps a negative NaN's sign through the add)
    from detkit.kernels import spec

    bias = torch.tensor([neg_nan, 0, 0], dtype=ints).view(dtype)
    bias[1:] = torch.tensor([-0.0, 2.0])
    a, b = torch.ones(2, 0, dtype=dtype), torch.ones(0, 3, dtype=dtype)
    got = kernels.matmul(a, b, bias, portable=True)
    assert torch.equal(got.view(ints), spec.matmul(a, b, bias).view(ints))


@pytest.mark.parametrize(("dtype", "ints", "neg_nan"), [(torch.float32, torch.int32, -0x00400000),
                                                        (torch.bfloat16, torch.int16, -0x0040),
                                                        (torch.float16, torch.int16, -0x0200)])
@pytest.mark.parametrize("k", [0, 3])
def test_portable_matmul_with_a_2d_bias_gives_canonical_nans(dtype: torch.dtype, ints: torch.dtype, neg_nan: int,
                                                             k: int) -> None:
    # A bias that is not 1-D is added by torch to the rounded product: a negative NaN in
    # it, or inf - inf, came out as a negative NaN (bfloat16: 0xFFFF), not the canonical
    # NaN of every other portable output (and of the CUDA backend).
    bias = torch.zeros(2, 3, dtype=dtype)
    bias[0, 0:1] = torch.tensor([neg_nan], dtype=ints).view(dtype)
    bias[1, 1] = math.inf
    a, b = torch.ones(2, k, dtype=dtype), torch.ones(k, 3, dtype=dtype)
    if k:
        a[1, 0] = -math.inf
    got = kernels.matmul(a, b, bias, portable=True)
    canonical = torch.tensor(math.nan, dtype=dtype).view(ints)
    nan = got.isnan()
    assert nan[0, 0] and (nan[1, 1] or not k)  # row 1: -inf + inf with k > 0
    assert torch.equal(got.view(ints)[nan], canonical.expand(int(nan.sum())))


@pytest.mark.parametrize("portable", ["no", 0, None])
def test_portable_must_be_a_bool(portable: object) -> None:
    """The flag chooses the guarantee, so it is not read by truthiness ("no" was portable)."""
    x = x32(2, 3)
    for call in (
        lambda: kernels.softmax(x, portable=portable),
        lambda: kernels.matmul(x, x.t(), portable=portable),
        lambda: kernels.sum(x, portable=portable),
        lambda: kernels.attention(x, x, x, portable=portable),
    ):
        with pytest.raises(InputError, match="portable must be True or False"):
            call()


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_is_causal_enable_gqa_and_keepdim_must_be_bools(flag: object) -> None:
    """As SDPA and torch.sum refuse them: is_causal="no" ran causal attention, keepdim="no" kept the dim."""
    x = x32(2, 3)
    for call, name in (
        (lambda: kernels.attention(x, x, x, is_causal=flag), "is_causal"),
        (lambda: kernels.attention(x, x, x, enable_gqa=flag), "enable_gqa"),
        (lambda: kernels.sum(x, keepdim=flag), "keepdim"),
        (lambda: kernels.mean(x, keepdim=flag), "keepdim"),
    ):
        with pytest.raises(InputError, match=f"{name} must be True or False"):
            call()


def test_zero_dim_tensors() -> None:
    s = torch.tensor(2.5)
    assert torch.equal(kernels.softmax(s), torch.softmax(s, 0))
    assert torch.equal(kernels.log_softmax(s), torch.log_softmax(s, 0))
    assert torch.equal(kernels.sum(s), s)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("fn", ["sum", "mean"])
def test_zero_dim_reductions_are_a_row_of_one(fn: str, portable: bool) -> None:
    """A 0-dim tensor gives the bits of the same value as a row of one (torch: sum of
    -0.0 is +0.0; portable: a NaN comes back as the canonical NaN)."""
    reduce = getattr(kernels, fn)
    neg_nan = torch.tensor(-(2**22) - 1, dtype=torch.int32).view(torch.float32)  # 0xFFBFFFFF
    for value in (torch.tensor(-0.0), neg_nan, torch.tensor(2.5)):
        got = reduce(value, portable=portable)
        want = reduce(value.reshape(1), portable=portable)
        assert got.shape == () and torch.equal(got.view(torch.int32), want.view(torch.int32)), value
    assert torch.equal(kernels.sum(torch.tensor(-0.0)).view(torch.int32), torch.tensor(-0.0).sum().view(torch.int32))
    assert reduce(torch.tensor(2.5), 0, keepdim=True, portable=portable).shape == ()


def test_fully_masked_query_returns_zeros_like_torch() -> None:
    q, k, v = x32(1, 1, 3, 8), x32(1, 1, 4, 8), x32(1, 1, 4, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    got = kernels.attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))
    assert torch.allclose(got, want, atol=1e-6)


def test_nan_and_inf_propagate_like_torch() -> None:
    x = x32(4, 9)
    x[0, 3] = math.nan
    x[1, 2] = math.inf
    x[2, 5] = -math.inf
    for ours, theirs in [
        (kernels.softmax(x), torch.softmax(x, -1)),
        (kernels.log_softmax(x), torch.log_softmax(x, -1)),
        (kernels.rms_norm(x), F.rms_norm(x, (9,))),
        (kernels.layer_norm(x), F.layer_norm(x, (9,))),
        (kernels.sum(x), x.sum(-1)),
        (kernels.mean(x), x.mean(-1)),
        (kernels.matmul(x, x32(9, 3)), x @ x32(9, 3)),
    ]:
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.equal(torch.isinf(ours) & (ours > 0), torch.isinf(theirs) & (theirs > 0))


def test_requires_grad_inputs_work_forward_only_and_say_so() -> None:
    """The kernels are forward only; a silently missing gradient (the result summed with
    other terms) would be worse than a warning. Under no_grad, or detached, nothing is said."""
    import warnings

    w = x32(5, 3).requires_grad_()
    with pytest.warns(UserWarning, match=r"detkit.kernels.matmul: b requires grad, but detkit.kernels are forward only"):
        out = kernels.matmul(x32(2, 5), w)
    assert not out.requires_grad
    assert out.shape == (2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            kernels.matmul(x32(2, 5), w)
        kernels.softmax(w.detach())


def test_sparse_input_is_rejected() -> None:
    with pytest.raises(InputError, match="dense"):
        kernels.softmax(x32(3, 3).to_sparse())


def test_softmax_dtype_argument_casts_first() -> None:
    x = torch.arange(6).reshape(2, 3)
    got = kernels.softmax(x, dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.softmax(x, -1, dtype=torch.float32))
    with pytest.raises(InputError, match="not supported"):
        kernels.softmax(x, dtype=torch.int64)


@pytest.mark.parametrize("portable", [False, True])
def test_cumsum_arguments_like_torch(portable: bool) -> None:
    x = torch.arange(6).reshape(2, 3)
    got = kernels.cumsum(x, 1, dtype=torch.float32, portable=portable)
    assert got.dtype == torch.float32 and torch.equal(got, torch.cumsum(x, 1, dtype=torch.float32))
    s = torch.tensor(-2.5)
    assert torch.equal(kernels.cumsum(s, 0, portable=portable), s) and kernels.cumsum(s, -1).shape == ()
    empty = torch.empty(0, 3)
    assert kernels.cumsum(empty, 0, portable=portable).shape == (0, 3)
    with pytest.raises(InputError, match="not supported"):
        kernels.cumsum(x, dtype=torch.int64)
    with pytest.raises(InputError, match="dim 2 is out of range"):
        kernels.cumsum(x32(2, 3), 2, portable=portable)
    with pytest.raises(InputError, match="dim must be one int"):
        kernels.cumsum(x32(2, 3), (0, 1), portable=portable)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        kernels.cumsum([1.0, 2.0], portable=portable)  # type: ignore[arg-type]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cumsum_of_a_0d_tensor_is_the_tensor_as_torchs(portable: bool, dtype: torch.dtype) -> None:
    # torch's cumsum of a 0-d tensor is a copy of it (on every device), so -0.0 stays -0.0;
    # the kernel added it to the running sum's +0.0 and gave +0.0, under the mode too.
    # (A row of one element is a running sum from +0.0 in torch as well: [-0.0] -> [0.0].)
    if portable and dtype == torch.float64:
        pytest.skip("the portable kernels take no float64")
    import detkit

    for v in (-0.0, 0.0, -2.5, float("inf")):
        s = torch.tensor(v, dtype=dtype)
        want = torch.cumsum(s, 0)
        for dim in (0, -1):
            got = kernels.cumsum(s, dim, portable=portable)
            assert got.shape == () and got.dtype == dtype and torch.equal(got, want), (v, dim)
            assert bool(torch.signbit(got)) == bool(torch.signbit(want)), (v, dim)
        with detkit.batch_invariant(portable=portable) as bi:
            got = torch.cumsum(s, 0)
        assert bool(torch.signbit(got)) == bool(torch.signbit(want)) and bi.routed() == {"cumsum": 1}, v
    one = kernels.cumsum(torch.tensor([-0.0], dtype=dtype), 0, portable=portable)
    assert not bool(torch.signbit(one[0])) and not bool(torch.signbit(torch.cumsum(torch.tensor([-0.0]), 0)[0]))
    nan = kernels.cumsum(torch.tensor(float("nan"), dtype=dtype), 0, portable=portable)
    assert nan.shape == () and bool(torch.isnan(nan))


def test_solve_triangular_argument_errors() -> None:
    a, b = x32(3, 3), x32(3, 2)
    with pytest.raises(InputError, match=r"a must be \(\.\.\., n, n\) square matrices, got shape \(3, 2\)"):
        kernels.solve_triangular(b, b, upper=False)
    with pytest.raises(InputError, match=r"b must be \(\.\.\., k, 3\) to match a of shape \(3, 3\) with left=False"):
        kernels.solve_triangular(a, b, upper=False, left=False)
    with pytest.raises(InputError, match="do not broadcast"):
        kernels.solve_triangular(x32(2, 3, 3), x32(4, 3, 2), upper=False)
    with pytest.raises(InputError, match="upper must be True or False"):
        kernels.solve_triangular(a, b, upper=None)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="same dtype"):
        kernels.solve_triangular(a, b.double(), upper=False)
    with pytest.raises(InputError, match="float32, bfloat16, float16 or float64"):
        kernels.solve_triangular(a.long(), b.long(), upper=False)
    assert kernels.solve_triangular(x32(2, 0, 0), x32(0, 5), upper=True).shape == (2, 0, 5)


def test_rms_norm_default_eps_is_torch_default() -> None:
    x = x32(3, 16) * 1e-4
    want = F.rms_norm(x.double(), (16,), eps=torch.finfo(torch.float32).eps)
    assert torch.allclose(kernels.rms_norm(x).double(), want, rtol=1e-6)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_default_eps_of_half_dtypes_is_float32_eps(dtype: torch.dtype, portable: bool) -> None:
    # torch's rms_norm takes the epsilon of its opmath type (float32), not finfo(dtype)
    x = (x32(3, 16) * 1e-3).to(dtype)
    want = F.rms_norm(x, (16,))
    got = kernels.rms_norm(x, portable=portable)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("portable", [False, True])
def test_missing_numba_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch, portable: bool) -> None:
    """`pip install --no-deps` leaves numba out: the CPU backends' import then fails on it."""
    import sys

    name = _backend.BACKEND_MODULES[("cpu", portable)]
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ModuleNotFoundError(name="numba")
    with pytest.raises(BackendUnavailable, match=r"need numba, which is not installed: `pip install 'numba>=0.60'`"):
        _backend.backend_for("cpu", portable)


@pytest.mark.parametrize("portable", [False, True])
def test_matmul_bias_broadcasts_to_the_result_of_a_1d_operand(portable: bool) -> None:
    # The bias must broadcast to torch.matmul(a, b)'s shape, which drops the dimension of
    # a 1-D a or b: an (M,) bias of a matrix-vector product was refused ("would enlarge
    # the result (M, 1)") and an (M, 1) bias, which torch broadcasts to (M, M), was
    # taken and the result squeezed to (M,).
    a, b = x32(3, 4), x32(2, 4, 5)
    vec = x32(4)
    cases = [
        (a, vec, x32(3)),  # (M,) over the rows of a matrix-vector product
        (x32(2, 3, 4), vec, x32(2, 3)),  # (B, M)
        (vec, b, x32(2, 5)),  # (B, N) for a 1-D a
        (vec, b, x32(5)),
        (a, vec, x32(1)),
    ]
    for left, right, bias in cases:
        got = kernels.matmul(left, right, bias, portable=portable)
        want = torch.matmul(left.double(), right.double()) + bias.double()
        assert got.shape == want.shape, (tuple(left.shape), tuple(right.shape), tuple(bias.shape))
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    for left, right, bias in [(a, vec, x32(3, 1)), (vec, x32(4, 5), x32(1, 5))]:
        with pytest.raises(InputError, match="would enlarge the result"):
            kernels.matmul(left, right, bias, portable=portable)


def test_numpy_scalars_are_numbers_for_dim_and_eps() -> None:
    # torch takes a numpy integer dim and a numpy float eps; they were refused with
    # "dim must be one int" / "eps must be a finite number >= 0", and an int eps beyond
    # float's range raised OverflowError instead of InputError.
    import numpy as np

    x = x32(2, 5)
    assert torch.equal(kernels.softmax(x, np.int64(0)), kernels.softmax(x, 0))
    assert torch.equal(kernels.sum(x, np.int32(-1), keepdim=True), kernels.sum(x, -1, keepdim=True))
    assert torch.equal(kernels.rms_norm(x, None, np.float32(1e-5)), kernels.rms_norm(x, None, float(np.float32(1e-5))))
    assert torch.equal(kernels.layer_norm(x, eps=np.float64(1e-5)), kernels.layer_norm(x, eps=1e-5))
    for bad in (10**400, np.float32(np.inf), np.bool_(True)):
        with pytest.raises(InputError, match="eps must be"):
            kernels.rms_norm(x, None, bad)
    with pytest.raises(InputError, match="dim must be one int"):
        kernels.softmax(x, np.float64(1.0))


def test_nested_tensors_and_sparse_bool_masks_are_rejected() -> None:
    # A (strided) nested tensor raised torch's "Internal error: NestedTensorImpl doesn't
    # support sizes", a sparse bool attn_mask "expand is unsupported for Sparse tensors".
    import warnings

    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prototype/beta warnings of nested and CSR tensors
        nested = torch.nested.nested_tensor([x32(2, 3), x32(4, 3)])
        sparse_masks = (mask.to_sparse(), mask.to_sparse_csr())
    with pytest.raises(InputError, match="x is a nested tensor"):
        kernels.softmax(nested)
    with pytest.raises(InputError, match="a is a nested tensor"):
        kernels.matmul(nested, x32(3, 2))
    q = x32(1, 2, 4, 8)
    for sparse in sparse_masks:
        with pytest.raises(InputError, match="attn_mask is a torch.sparse"):
            kernels.attention(q, q, q, attn_mask=sparse)
