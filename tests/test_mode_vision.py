"""Vision towers under the mode: an image's features never depend on the other images.

A multimodal server batches the images of several requests through one vision encoder. The
towers of LLaVA (CLIP), Qwen2.5-VL (windowed attention over flattened patches, 2-D RoPE),
GLM-4V (its position table resampled by a bicubic ``grid_sample``), Gemma 3 (SigLIP, then
an ``avg_pool2d`` of its patches into image tokens), Idefics3 (SigLIP on 5-D pixel
batches) and Mistral 3 (Pixtral, a patch merger) are built small from their configs and
run on one image alone and inside batches of others, at every position: under the mode
every image's features are the same bits, in both modes, with nothing left to torch; and a
whole request (its prompt's image tokens filled with its image's features) gives the same
logits alone and beside another. ``avg_pool2d`` is routed (``avg_pool2d_in_order``) and
checked against torch's own CPU kernel bit for bit.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import isa_children, load_script
from hypothesis import given
from hypothesis import strategies as st

import detkit
from detkit._testing_values import host_bits
from detkit.mode import coverage_report, trace_ops

pytestmark = pytest.mark.usefixtures("mode_left_off")

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LAYOUTS = ("contiguous", "channels_last", "unbatched", "transposed")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "unbatched":
        return x[0]
    if layout == "transposed":
        return x.transpose(-1, -2)
    return x


@st.composite
def _pools(draw: st.DrawFn) -> dict[str, Any]:
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return dict(
        kernel_size=(kh, kw),
        stride=draw(st.sampled_from([None, (1, 1), (kh, kw), (2, 3)])),
        padding=(draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))),
        ceil_mode=draw(st.booleans()),
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.sampled_from([None, None, 1, 5])),
    )


@pytest.mark.parametrize("layout", _LAYOUTS)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@given(pool=_pools(), height=st.integers(1, 11), width=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_avg_pool2d_is_routed_and_gives_torchs_cpu_bits(dtype: torch.dtype, layout: str, pool: dict[str, Any],
                                                       height: int, width: int, seed: int) -> None:
    """Every option of F.avg_pool2d, every float dtype and layout, values of magnitudes
    2^-8 to 2^8 (so the order of the additions shows in the sum) with NaN, ±inf and -0:
    the mode's result (one routed call) is torch's CPU result, bit for bit and with its
    strides; what torch refuses it still refuses."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, height, width)
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 9, shape, generator=g).float())).to(dtype)
    x[0, 0, 0, 0], x[1, 1, -1, -1], x[1, 2, 0, -1], x[0, 2, -1, 0] = float("nan"), -0.0, float("inf"), -float("inf")
    x = _layout(x, layout)
    try:
        want = F.avg_pool2d(x, **pool)
    except RuntimeError as err:
        with detkit.batch_invariant(), pytest.raises(RuntimeError, match=re.escape(str(err)[:30])):
            F.avg_pool2d(x, **pool)
        return
    with detkit.batch_invariant(strict=True) as bi:
        got = F.avg_pool2d(x, **pool)
    assert bi.routed() == {"avg_pool2d": 1}, bi.coverage()
    assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
    assert (host_bits(got) == host_bits(want)).all(), (pool, got, want)


def test_avg_pool2d_rows_do_not_depend_on_the_batch_in_either_mode() -> None:
    """Gemma 3's pooling (64 x 64 patches to 16 x 16 tokens, 4 x 4 windows): each image's
    pooled features are the same bits alone, in every batch size up to 9 and at every
    position of it, with the portable guarantee too; avg_pool1d reaches the same route."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 32, 64, 64, generator=g).to(torch.bfloat16)
    for portable in (False, True):
        with detkit.batch_invariant(portable=portable, strict=True) as bi:
            alone = [F.avg_pool2d(x[i:i + 1], 4) for i in range(9)]
            for n in range(2, 10):
                for start in range(0, 10 - n):
                    batch = F.avg_pool2d(x[start:start + n], 4)
                    for i in range(n):
                        assert (host_bits(batch[i]) == host_bits(alone[start + i][0])).all(), (n, start, i)
            F.avg_pool1d(x[0], 4)
        assert set(bi.routed()) == {"avg_pool2d"} and bi.not_portable() == {}, bi.coverage()


def test_avg_pool2d_in_order_is_the_documented_order() -> None:
    """The order is a written-down one, not torch's by luck: a window of 1, 2^24 and -2^24
    sums to 0 in row-major order from +0 (1 + 2^24 rounds to 2^24 in float32) and to 1 in
    any order that adds the large values first."""
    x = torch.tensor([[[[1.0, 2.0**24], [-(2.0**24), 0.0]]]])
    with detkit.batch_invariant(portable=True):
        assert F.avg_pool2d(x, 2, divisor_override=1).item() == 0.0
    assert (x[0, 0, 0, 1] + x[0, 0, 1, 0] + x[0, 0, 0, 0]).item() == 1.0


def test_gradients_flow_through_the_routed_pool() -> None:
    """The route runs below autograd: torch's own backward formula still applies."""
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with detkit.batch_invariant():
        F.avg_pool2d(x, 2).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_the_towers_index_ops_are_classed_exact() -> None:
    """What the towers call besides routed ops: Idefics3's Tensor.unfold and bucketize,
    Mistral 3's F.unfold (im2col), Qwen-VL's repeat_interleave and unique_consecutive
    (views, copies, comparisons, integer bounds) are exact. (Interpolation is routed:
    tests/test_mode_interpolation.py.)"""
    x, points, edges = torch.randn(2, 3, 8, 8), torch.rand(10), torch.linspace(0, 1, 5)
    counts, ids = torch.tensor([4, 4, 8]), torch.tensor([1, 1, 2, 2, 3])

    def tower_ops() -> None:
        x.unfold(2, 4, 4)
        F.unfold(x, kernel_size=2, stride=2)
        torch.bucketize(points, edges)
        torch.repeat_interleave(counts)
        torch.unique_consecutive(ids)

    _, ops = trace_ops(tower_ops)
    report = coverage_report(ops)
    assert report.uncovered == {} and {"unfold.default", "im2col.default", "bucketize.Tensor",
                                       "unique_consecutive.default"} <= set(report.exact), report
    assert any(op.startswith("repeat_interleave") for op in report.exact), report


# ----------------------------------------------------------------------------- vision towers

# model_type: (its config's fields, its vision config's fields, how its images are given):
# small towers, several patches an image, each family's own input convention.
TOWERS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "llava": ({}, dict(image_size=32, patch_size=8), "square"),
    "qwen2_5_vl": ({}, dict(window_size=32), "patches"),
    # its position table resampled to each image's grid by a bicubic grid_sample (routed)
    "glm4v": ({}, dict(out_hidden_size=64), "patches"),
    "gemma3": (dict(mm_tokens_per_image=16), dict(image_size=64, patch_size=8), "square"),
    "idefics3": ({}, dict(image_size=32, patch_size=8), "tiles"),
    "mistral3": ({}, dict(image_size=32, patch_size=8), "sized"),
}
IMAGES = 5


@functools.lru_cache(maxsize=None)
def _tower(model_type: str, dtype: torch.dtype) -> tuple[Any, Callable[[list[int]], dict[str, Any]]]:
    """The model (random weights, eval) and a function from image numbers to the keyword
    arguments of its ``get_image_features`` for those images, batched."""
    import transformers

    sweep = load_script(Path(__file__).resolve().parents[1] / "scripts" / "sweep_causal_lms.py")
    top, vision, convention = TOWERS[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = sweep.small_config(model_type)
        for key, value in top.items():
            setattr(config, key, value)
        for key, value in vision.items():
            setattr(config.vision_config, key, value)
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    # Gemma 3 initialises its projection to the text width with zeros: every image's
    # features would be 0, and any comparison vacuous
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    model = model.to(dtype)
    vc = config.vision_config
    # numpy's generator: torch's seeded randn is not the same bits on every instruction set
    rng = np.random.default_rng(1)

    def pixels(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype)

    if convention == "patches":  # Qwen-VL: flattened patches, 8 x 8 an image, and their grid
        images = [pixels(64, 3 * vc.temporal_patch_size * vc.patch_size**2) for _ in range(IMAGES)]

        def inputs(ids: list[int]) -> dict[str, Any]:
            return dict(pixel_values=torch.cat([images[i] for i in ids]),
                        image_grid_thw=torch.tensor([[1, 8, 8]] * len(ids)))
    else:
        images = [pixels(3, vc.image_size, vc.image_size) for _ in range(IMAGES)]

        def inputs(ids: list[int]) -> dict[str, Any]:
            batch = torch.stack([images[i] for i in ids])
            if convention == "tiles":  # Idefics3: (batch, tiles, 3, H, W) and which pixels are real
                mask = torch.ones(len(ids), 1, vc.image_size, vc.image_size, dtype=torch.bool)
                return dict(pixel_values=batch[:, None], pixel_attention_mask=mask)
            if convention == "sized":  # Pixtral: each image's size
                return dict(pixel_values=batch, image_sizes=torch.tensor([[vc.image_size] * 2] * len(ids)))
            return dict(pixel_values=batch)
    return model, inputs


def _features(model: Any, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """One tensor of features per image (every family's output, as its model returns it)."""
    out = model.get_image_features(**inputs)
    features = getattr(out, "pooler_output", out)
    n = len(inputs["image_grid_thw"]) if "image_grid_thw" in inputs else len(inputs["pixel_values"])
    if isinstance(features, (list, tuple)):
        return [f.reshape(-1, f.shape[-1]) for f in features] if len(features) == n else list(
            torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).chunk(n))
    return list(features.reshape(-1, features.shape[-1]).chunk(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_type", sorted(TOWERS))
def test_an_images_features_do_not_depend_on_the_other_images(model_type: str, dtype: torch.dtype) -> None:
    """Each of 5 images alone, then in batches of 2 to 5 at every position: under both
    modes its features are the same bits every time; the trace has no op the mode leaves
    to torch and no call fell back (or, in portable mode, took torch's math library)."""
    model, inputs = _tower(model_type, dtype)
    with torch.no_grad():
        _, ops = trace_ops(lambda: _features(model, inputs([0, 1])))
        for portable in (False, True):
            report = coverage_report(ops, portable=portable)
            assert report.uncovered == {} and (not portable or report.not_portable == {}), report
            with detkit.batch_invariant(portable=portable) as bi:
                alone = [_features(model, inputs([i]))[0] for i in range(IMAGES)]
                assert all(a.numel() > 0 for a in alone)
                for n in range(2, IMAGES + 1):
                    for start in range(IMAGES - n + 1):
                        batch = _features(model, inputs(list(range(start, start + n))))
                        for i, got in enumerate(batch):
                            assert (host_bits(got) == host_bits(alone[start + i])).all(), (portable, n, start, i)
            assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
    assert not torch.equal(alone[0], alone[1])  # the images differ, and so do their features


# Run in a fresh process: each tower's features of two images, as digests, with the mode off
# and under portable mode. The weights come from the parent (torch's seeded normal_ is ISA
# dependent itself).
_CHILD = r"""
import hashlib, json, sys
import torch
sys.path.insert(0, sys.argv[2])
import test_mode_vision as T
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name in T.TOWERS:
    model, inputs = T._tower(name, torch.float32)
    model.load_state_dict(torch.load(f"{sys.argv[1]}/{name}.pt"))
    import detkit
    with torch.no_grad():
        off = T._features(model, inputs([0, 1]))
        with detkit.batch_invariant(portable=True):
            portable = T._features(model, inputs([0, 1]))
    h = lambda ts: hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in ts)).hexdigest()
    out[name] = {"off": h(off), "portable": h(portable)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_portable_features_are_the_same_under_torchs_scalar_kernels(tmp_path: Any) -> None:
    """Portable mode's features of every tower are the same bits with torch's vector
    kernels and with its DEFAULT (scalar) ones. Negative control: torch's own features
    change for at least one tower (for all six on this EPYC), unless this CPU already
    runs DEFAULT."""
    for name in TOWERS:
        torch.save(_tower(name, torch.float32)[0].state_dict(), tmp_path / f"{name}.pt")
    runs = isa_children(_CHILD, [str(tmp_path), os.path.dirname(__file__)],
                        {"host": {}, "default": {"ATEN_CPU_CAPABILITY": "default"}})
    assert runs["default"]["capability"] == "DEFAULT"
    for name in TOWERS:
        assert runs["host"][name]["portable"] == runs["default"][name]["portable"], name
    if runs["host"]["capability"] == "DEFAULT":
        pytest.skip("this CPU already runs torch's DEFAULT kernels: no negative control")
    assert any(runs["host"][n]["off"] != runs["default"][n]["off"] for n in TOWERS), "negative control: none changed"


@pytest.mark.parametrize("model_type", ["gemma3", "idefics3", "llava", "mistral3"])
def test_a_requests_logits_with_its_image_do_not_depend_on_the_other_requests(model_type: str) -> None:
    """The whole multimodal forward: a prompt holding one image (its image tokens, then
    text) gives the same logits alone and batched with another request's prompt and image,
    first or second, under both modes; the features' copy into the image-token positions
    (masked_scatter) is exact, and nothing is left to torch."""
    model, inputs = _tower(model_type, torch.float32)
    config = model.config
    slots = _features(model, inputs([0]))[0].shape[0]
    token = 7  # an image token inside the small vocabulary
    for name in ("image_token_id", "image_token_index"):
        if hasattr(config, name):
            setattr(config, name, token)
    prompts = {0: [1, 2, *[token] * slots, 3, 4], 3: [5, 6, *[token] * slots, 8, 9]}

    def logits(images: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompts[i] for i in images])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs(images)).logits

    with torch.no_grad():
        _, ops = trace_ops(lambda: logits([0, 3]))
        for portable in (False, True):
            report = coverage_report(ops, portable=portable)
            assert report.uncovered == {} and (not portable or report.not_portable == {}), report
            assert "masked_scatter.default" in report.exact, report
            with detkit.batch_invariant(portable=portable) as bi:
                alone = logits([0])[0]
                first, second = logits([0, 3])[0], logits([3, 0])[1]
            assert bi.uncovered() == {} and bi.not_portable() == {}, bi.coverage()
            assert (host_bits(first) == host_bits(alone)).all() and (host_bits(second) == host_bits(alone)).all()
    assert not torch.equal(logits([3])[0], alone)  # the other request's image and text change its own logits
