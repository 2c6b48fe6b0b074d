"""detkit.compare: ULP distance on hand-checked cases and properties, diff, first_divergence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detkit.compare import NAN_MISMATCH, ULP_SATURATED, diff, first_divergence, ulp_distance
from detkit.errors import InputError

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
BITS = {torch.float64: 64, torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def from_bits(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``dtype`` with the given unsigned bit patterns."""
    width = BITS[dtype]
    signed = [b - (1 << width) if b >= 1 << (width - 1) else b for b in bits]
    return torch.tensor(signed, dtype=INT_VIEW[dtype]).view(dtype)


def one(a: object, b: object) -> int:
    return int(ulp_distance(a, b).reshape(-1)[0])


# ------------------------------------------------------------------ hand-checked cases


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_one_and_its_successor_are_one_ulp_apart(dtype: torch.dtype) -> None:
    x = torch.ones(1, dtype=dtype)
    nxt = torch.nextafter(x, torch.full_like(x, 2.0))
    assert one(x, nxt) == 1
    assert one(x, x) == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_signed_zeros_are_zero_ulp_apart_but_differ_bitwise(dtype: torch.dtype) -> None:
    pz, nz = torch.zeros(1, dtype=dtype), -torch.zeros(1, dtype=dtype)
    assert one(pz, nz) == 0
    d = diff(pz, nz)
    assert not d.bitwise_equal and d.num_bit_mismatches == 1
    assert d.num_value_mismatches == 0 and d.signed_zero_mismatches == 1


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_smallest_subnormals_of_opposite_sign_are_two_apart(dtype: torch.dtype) -> None:
    width = BITS[dtype]
    tiny, neg_tiny = from_bits([1], dtype), from_bits([(1 << (width - 1)) | 1], dtype)
    assert tiny.item() > 0 > neg_tiny.item()
    assert one(tiny, neg_tiny) == 2


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_max_finite_and_inf_are_one_apart(dtype: torch.dtype) -> None:
    big = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    inf = torch.tensor([float("inf")], dtype=dtype)
    assert one(big, inf) == 1
    assert one(-big, -inf) == 1


def test_float32_across_the_whole_range_does_not_overflow_int32() -> None:
    a, b = np.float32(3e38), np.float32(-3e38)
    # 3e38 is 0x7F61B1E6 = 2,137,108,966; across zero the distance doubles.
    assert int(a.view(np.uint32)) == 0x7F61B1E6
    assert int(ulp_distance(a, b)) == 4_274_217_932
    assert int(ulp_distance(torch.tensor([3e38]), torch.tensor([-3e38]))[0]) == 4_274_217_932


def test_float64_distances_beyond_int64_saturate() -> None:
    inf = np.array([np.inf])
    assert int(ulp_distance(-inf, inf)[0]) == ULP_SATURATED
    big = np.array([np.finfo(np.float64).max])
    assert int(ulp_distance(-big, big)[0]) == ULP_SATURATED
    # Opposite signs but representable: exact, not saturated.
    assert int(ulp_distance(np.array([1.0]), np.array([-1.0]))[0]) == 2 * 0x3FF0000000000000
    assert int(ulp_distance(np.array([0.0]), inf)[0]) == 0x7FF0000000000000


@pytest.mark.parametrize(
    ("dtype", "a_bits", "b_bits", "expected"),
    [
        (torch.bfloat16, 0x3F80, 0x3F81, 1),  # 1.0 and 1.0078125
        (torch.bfloat16, 0x7F7F, 0x7F80, 1),  # max finite, inf
        (torch.bfloat16, 0x0001, 0x8001, 2),
        (torch.bfloat16, 0x3F80, 0xBF80, 2 * 0x3F80),
        (torch.float16, 0x3C00, 0x3C01, 1),  # 1.0 and 1.0009765625
        (torch.float16, 0x03FF, 0x0400, 1),  # largest subnormal, smallest normal
        (torch.float16, 0x7BFF, 0xFBFF, 2 * 0x7BFF),  # 65504 and -65504
    ],
)
def test_half_precision_neighbours(dtype: torch.dtype, a_bits: int, b_bits: int, expected: int) -> None:
    assert one(from_bits([a_bits], dtype), from_bits([b_bits], dtype)) == expected


def test_nan_handling() -> None:
    nan_a = np.array([0x7FC00000], dtype=np.uint32).view(np.float32)
    nan_b = np.array([0xFFC00001], dtype=np.uint32).view(np.float32)  # other sign and payload
    assert int(ulp_distance(nan_a, nan_b)[0]) == 0
    assert int(ulp_distance(nan_a, np.float32([1.0]))[0]) == NAN_MISMATCH
    assert int(ulp_distance(np.float32([np.inf]), nan_a)[0]) == NAN_MISMATCH


def test_float8_formats() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")

    def f8(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(bits, dtype=torch.uint8).view(dtype)

    e4m3 = torch.float8_e4m3fn
    assert one(f8([0x7E], e4m3), f8([0xFE], e4m3)) == 2 * 0x7E  # 448 vs -448
    assert one(f8([0x7F], e4m3), f8([0xFF], e4m3)) == 0  # both NaN
    assert one(f8([0x7F], e4m3), f8([0x7E], e4m3)) == NAN_MISMATCH
    e5m2 = torch.float8_e5m2
    assert one(f8([0x7B], e5m2), f8([0x7C], e5m2)) == 1  # 57344 vs inf
    fnuz = torch.float8_e4m3fnuz
    assert one(f8([0x80], fnuz), f8([0x00], fnuz)) == NAN_MISMATCH  # 0x80 is the NaN
    assert one(f8([0x01], fnuz), f8([0x81], fnuz)) == 2


def test_numpy_and_torch_inputs_mix_and_broadcast() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = torch.tensor([1.0, 2.0])
    d = ulp_distance(a, b)
    # 3.0 vs 1.0: one binade (2**23) plus half a binade (2**22); same for 4.0 vs 2.0 (one binade).
    assert d.tolist() == [[0, 0], [2**23 + 2**22, 2**23]]
    assert d.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_byte_swapped_numpy_arrays_compare_by_value(dtype: type) -> None:
    # A big-endian array (np.frombuffer(..., ">f4"), files written on other machines) was
    # read through a native uint view: 1.0 vs 1.0 came out 1065320385 ULPs apart in float32.
    native = np.array([1.0, -2.5, 0.0], dtype=dtype)
    swapped = native.astype(np.dtype(dtype).newbyteorder("S"))
    assert ulp_distance(swapped, native).tolist() == [0, 0, 0]
    assert diff(swapped, native).ok and diff(native, swapped).ok
    assert ulp_distance(swapped, np.nextafter(native, np.inf)).tolist() == [1, 1, 1]


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(InputError, match="dtype mismatch"):
        ulp_distance(np.float32([1.0]), np.float64([1.0]))
    with pytest.raises(InputError, match="int64"):
        ulp_distance(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(InputError, match="do not broadcast"):
        ulp_distance(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------ properties


def bit_patterns(dtype: torch.dtype, size: int = 16) -> st.SearchStrategy[torch.Tensor]:
    width = BITS[dtype]
    # Bias toward special regions: zeros, subnormals, max/inf, NaN, and uniform patterns.
    special = [0, 1, 2, (1 << (width - 1)) - 1, 1 << (width - 1), (1 << (width - 1)) + 1, (1 << width) - 1]
    one_pattern = st.one_of(st.integers(0, (1 << width) - 1), st.sampled_from(special))
    return st.lists(one_pattern, min_size=size, max_size=size).map(lambda b: from_bits(b, dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(data=st.data())
def test_symmetry(dtype: torch.dtype, data: st.DataObject) -> None:
    a, b = data.draw(bit_patterns(dtype)), data.draw(bit_patterns(dtype))
    np.testing.assert_array_equal(ulp_distance(a, b), ulp_distance(b, a))
    assert (ulp_distance(a, a) == 0).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(data=st.data())
def test_successor_is_one_ulp(dtype: torch.dtype, data: st.DataObject) -> None:
    x = data.draw(bit_patterns(dtype))
    x = x[torch.isfinite(x)]
    nxt = torch.nextafter(x, torch.full_like(x, float("inf")))
    assert (ulp_distance(x, nxt) == 1).all()
    prev = torch.nextafter(x, torch.full_like(x, float("-inf")))
    assert (ulp_distance(prev, x) == 1).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(data=st.data())
def test_distances_add_along_a_monotone_run(dtype: torch.dtype, data: st.DataObject) -> None:
    x = data.draw(bit_patterns(dtype, size=24))
    x = x[~torch.isnan(x)]
    run = torch.sort(x.double()).values.to(dtype)
    if run.numel() < 2:
        return
    steps = ulp_distance(run[:-1], run[1:])
    total = int(ulp_distance(run[:1], run[-1:])[0])
    if dtype == torch.float64 and total == ULP_SATURATED:
        return  # saturated on purpose; the sum below would exceed int64
    assert (steps >= 0).all()
    assert int(steps.astype(object).sum()) == total


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_rank_among_all_values_exhaustively(dtype: torch.dtype) -> None:
    """Independent oracle for 16-bit formats: distance == difference of value ranks."""
    everything = from_bits(list(range(1 << 16)), dtype)
    values = everything.double().numpy()
    ordered = np.unique(values[~np.isnan(values)])  # sorts, merges +0 and -0
    rank = np.searchsorted(ordered, values)
    rng = np.random.default_rng(0)
    i = rng.integers(0, 1 << 16, size=20000)
    j = rng.integers(0, 1 << 16, size=20000)
    keep = ~np.isnan(values[i]) & ~np.isnan(values[j])
    i, j = i[keep], j[keep]
    expected = np.abs(rank[i] - rank[j])
    got = ulp_distance(everything[torch.from_numpy(i)], everything[torch.from_numpy(j)])
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------ diff


def test_diff_equal() -> None:
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    d = diff(a, a.clone())
    assert d.ok and d.bitwise_equal and d.values_equal
    assert d.num_bit_mismatches == 0 and d.max_ulp == 0 and d.max_ulp_index is None
    assert d.numel == 35 and d.shape == (5, 7) and d.dtype == "float32"
    assert d.first_mismatches == []
    assert "bitwise equal" in str(d)


def test_diff_off_by_one_ulp() -> None:
    a = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[2, 3] = torch.nextafter(b[2, 3], torch.tensor(float("inf")))
    b[3, 5] = torch.nextafter(torch.nextafter(b[3, 5], torch.tensor(0.0)), torch.tensor(0.0))
    d = diff(a, b)
    assert not d.ok and d.num_bit_mismatches == 2 and d.num_value_mismatches == 2
    assert d.max_ulp == 2 and d.max_ulp_index == (3, 5)
    assert d.ulp_histogram == {"0": 22, "1": 1, "2-3": 1}
    assert [m.index for m in d.first_mismatches] == [(2, 3), (3, 5)]
    assert [m.flat_index for m in d.first_mismatches] == [15, 23]
    assert d.first_mismatches[0].a == a[2, 3].item() and d.first_mismatches[0].b == b[2, 3].item()
    assert d.first_mismatches[0].ulp == 1
    expected_abs = abs(a[3, 5].double() - b[3, 5].double()).item()
    ab = (a.double() - b.double()).abs()
    assert d.max_abs == ab.max().item()
    assert d.max_abs_index == tuple(int(i) for i in np.unravel_index(int(ab.argmax()), (4, 6)))
    rel = (ab / b.double().abs())
    assert d.max_rel == pytest.approx(rel.max().item(), rel=0, abs=0)
    assert expected_abs > 0
    text = str(d)
    assert "2 bit mismatches" in text and "(2, 3)" in text and "(3, 5)" in text
    json.dumps(d.to_dict(), allow_nan=False)


def test_diff_signed_zero_only() -> None:
    a = torch.tensor([0.0, 1.0, -0.0], dtype=torch.bfloat16)
    b = torch.tensor([-0.0, 1.0, 0.0], dtype=torch.bfloat16)
    d = diff(a, b)
    assert not d.bitwise_equal and d.values_equal
    assert d.num_bit_mismatches == 2 and d.signed_zero_mismatches == 2
    assert d.num_value_mismatches == 0 and d.max_ulp == 0 and d.max_abs == 0.0


def test_diff_nan_payload_and_nan_vs_number() -> None:
    bits_a = np.array([0x7FF8000000000000, 0x7FF8000000000001, 0x3FF0000000000000], dtype=np.uint64)
    bits_b = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF8000000000000], dtype=np.uint64)
    d = diff(bits_a.view(np.float64), bits_b.view(np.float64))
    assert d.num_bit_mismatches == 2
    assert d.nan_payload_mismatches == 1  # NaN vs NaN with another payload: not a value mismatch
    assert d.nan_mismatches == 1 and d.num_value_mismatches == 1
    assert d.max_ulp == 0  # NaN vs number is not folded into the ULP statistics
    assert d.first_mismatches[1].ulp == NAN_MISMATCH
    payload = json.dumps(d.to_dict(), allow_nan=False)
    assert '"b": "nan"' in payload
    assert "NaN-vs-num" in str(d)


def test_diff_inf_and_zero_reference_stay_json_safe() -> None:
    a = np.array([np.inf, 1e-30, 2.0], dtype=np.float32)
    b = np.array([1.0, 0.0, 2.0], dtype=np.float32)
    d = diff(a, b)
    assert d.max_abs == np.inf and d.max_rel == np.inf
    out = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert out["max_abs"] == "inf"


@pytest.mark.parametrize("a_value", [1.0, -np.inf, 3.0e38])
def test_diff_against_an_infinite_reference_is_an_infinite_relative_error(a_value: float) -> None:
    """Before, |a - inf| / inf was NaN: max_rel read nan, and argmax put it first, hiding
    the finite relative error of the other elements."""
    a = np.array([a_value, 3.0, 2.0], dtype=np.float32)
    b = np.array([np.inf, 2.0, 2.0], dtype=np.float32)
    d = diff(a, b)
    assert d.max_rel == np.inf and d.max_rel_index == (0,)
    assert "nan" not in str(d)
    assert diff(a[1:], b[1:]).max_rel == 0.5


def test_diff_shape_and_dtype_mismatch_raise() -> None:
    with pytest.raises(InputError, match=r"shape mismatch: a is \(2, 3\), b is \(3, 2\)"):
        diff(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(InputError, match="dtype mismatch"):
        diff(torch.zeros(3), torch.zeros(3, dtype=torch.float16))


def test_diff_caps_listed_mismatches() -> None:
    a = np.arange(100, dtype=np.float32)
    d = diff(a, a + 1, max_mismatches=3)
    assert len(d.first_mismatches) == 3 and d.num_bit_mismatches == 100
    assert [m.flat_index for m in d.first_mismatches] == [0, 1, 2]
    assert "... 97 more" in str(d)


# ------------------------------------------------------------------ first_divergence


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 2, 3], [1, 2, 3], None),
        ([1, 2, 3], [1, 9, 3], 1),
        ([5], [6], 0),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2], [1, 2, 3, 4], 2),
        ([], [], None),
        ([], [7], 0),
    ],
)
def test_first_divergence(a: list[int], b: list[int], expected: int | None) -> None:
    assert first_divergence(a, b) == expected
    assert first_divergence(torch.tensor(a, dtype=torch.long), np.array(b, dtype=np.int64)) == expected


def test_first_divergence_rejects_text_and_floats() -> None:
    with pytest.raises(InputError, match="token ids"):
        first_divergence("abc", "abd")
    with pytest.raises(InputError, match="integer"):
        first_divergence(np.array([1.0]), np.array([1.0]))


def test_diff_values_under_flush_denormal_mode() -> None:
    """Under torch.set_flush_denormal(True) diff showed subnormals as 0 ("0 vs 0, 256 ULP")
    and max abs 0; the values and errors are those of the bits."""
    a, b = torch.tensor([2.0**-140]), torch.tensor([2.0**-141])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        d = diff(a, b)
    finally:
        torch.set_flush_denormal(False)
    assert (d.first_mismatches[0].a, d.first_mismatches[0].b) == (2.0**-140, 2.0**-141)
    assert d.max_abs == 2.0**-141 and d.max_rel == 1.0


def test_diff_summary_parts_add_up_to_the_bit_mismatches() -> None:
    """The header used to list num_value_mismatches (which includes NaN vs number) and
    nan_mismatches side by side, so a NaN-vs-number pair was counted twice and the parts
    added to more than the total."""
    a = np.array([1.0, np.nan, 0.0, 2.0, np.nan], dtype=np.float32)
    b = np.array([1.0, 1.0, -0.0, 3.0, np.nan], dtype=np.float32)
    b[4:] = np.array([0x7FC00001], dtype=np.uint32).view(np.float32)  # another NaN payload
    d = diff(a, b)
    head = str(d).splitlines()[0]
    assert "4 bit mismatches (1 numbers differ, 1 NaN vs number, 1 signed zeros, 1 NaN payloads)" in head


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40), st.data())
def test_diff_summary_parts_partition_property(bits_a: list[int], data: st.DataObject) -> None:
    import re

    bits_b = data.draw(st.lists(st.sampled_from(bits_a + [0, 0x80000000, 0x7FC00000, 0x7FC00001, 0x3F800000]),
                                min_size=len(bits_a), max_size=len(bits_a)))
    a = np.array(bits_a, dtype=np.uint32).view(np.float32)
    b = np.array(bits_b, dtype=np.uint32).view(np.float32)
    d = diff(a, b)
    if d.ok:
        return
    m = re.search(r"(\d+) bit mismatches \((\d+) numbers differ, (\d+) NaN vs number, (\d+) signed zeros, "
                  r"(\d+) NaN payloads\)", str(d))
    assert m is not None
    total, *parts = (int(g) for g in m.groups())
    assert total == d.num_bit_mismatches == sum(parts)
