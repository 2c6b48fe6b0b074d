"""The audit's parts in-process: catalogue, comparison, checks, runner, summary, renderers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from detkit.audit import catalogue, impls
from detkit.audit.catalogue import CATALOGUE, FLOAT_DTYPES, Inputs, OpSpec, build_inputs, resolve_ops
from detkit.audit.checks import CHECKS, compare
from detkit.audit.render import heat_map_svg, short_cell, to_html, to_markdown, ulp_histogram_svg
from detkit.audit.runner import AuditConfig, audit_one, parse_batch_sizes, parse_fail_on, run_audit
from detkit.audit.summary import advice, fail_on_failures, summarize
from detkit.errors import BackendUnavailable, InputError
from detkit.report import ReportWriter, load_report

SIZES = (1, 2, 3, 5, 8)


def _spec(name: str, call: Any, *, width: int = 16) -> OpSpec:
    """A synthetic op over (b, width) float32 rows, for checks that must see a known defect."""

    def build(b: int, dtype: torch.dtype, g: np.random.Generator, hidden: int) -> Inputs:
        return Inputs({"input": torch.from_numpy(g.standard_normal((b, width), dtype=np.float32)).to(dtype)})

    return OpSpec(name, "reduction", "synthetic", build, call)


def _cfg(**kw: Any) -> AuditConfig:
    base = dict(ops=("sum",), impls=("torch",), batch_sizes=SIZES, runs=2, hidden=64)
    base.update(kw)
    return AuditConfig(**base)


def _checks(spec: OpSpec, **kw: Any) -> dict[str, dict[str, Any]]:
    return audit_one(spec, "torch", kw.pop("dtype", "float32"), _cfg(**kw), torch.device("cpu"))["checks"]


# --- catalogue ---------------------------------------------------------------------------


def test_catalogue_covers_the_issue_list() -> None:
    names = {s.name for s in CATALOGUE}
    wanted = {"mm", "addmm", "bmm", "matmul", "linear", "softmax", "log_softmax", "layer_norm", "rms_norm", "sum",
              "mean", "cumsum", "solve_triangular", "scaled_dot_product_attention", "index_add", "scatter_add",
              "embedding_bag", "argmax", "topk"}
    assert wanted <= names


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", list(FLOAT_DTYPES))
def test_every_spec_runs_and_keeps_the_batch_in_dim0(spec: OpSpec, dtype: str) -> None:
    inputs = build_inputs(spec, 3, FLOAT_DTYPES[dtype], seed=1, hidden=64)
    assert inputs.batch == 3
    outs = spec.run(inputs)
    assert all(o.shape[0] == 3 for o in outs)
    again = build_inputs(spec, 3, FLOAT_DTYPES[dtype], seed=1, hidden=64)
    for k, t in inputs.batched.items():  # the same seed gives the same bits
        assert torch.equal(t, again.batched[k])
    assert all(o.shape[0] == 2 for o in spec.run(inputs.rows(slice(0, 2))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_mm_spec_is_each_tokens_product_with_its_expert(dtype: str) -> None:
    """The MoE spec sorts, multiplies and unsorts: row t is input[t] @ weight[expert[t]].T,
    and every expert gets tokens at the batch sizes the audit uses."""
    spec = catalogue.OPS["grouped_mm"]
    inputs = build_inputs(spec, 64, FLOAT_DTYPES[dtype], seed=3, hidden=64)
    x, expert, w = inputs.batched["input"], inputs.batched["expert"], inputs.fixed["weight"]
    assert set(expert.tolist()) == set(range(catalogue.MOE_EXPERTS))
    want = torch.stack([x[t].double() @ w[int(expert[t])].double().t() for t in range(64)])
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == "bfloat16" else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(spec.run(inputs)[0].double(), want, **tol)


def test_the_convolution_specs_are_a_causal_depthwise_conv_and_a_patch_embedding() -> None:
    """conv1d: output t of channel c is bias[c] + the filter over inputs t-3..t (zeros
    before the start), as Mamba's; conv2d: each 16 x 16 tile of the image times each filter."""
    spec = catalogue.OPS["conv1d"]
    inputs = build_inputs(spec, 3, torch.float32, seed=4, hidden=64)
    x, w, b = (t.double() for t in (inputs.batched["input"], inputs.fixed["weight"], inputs.fixed["bias"]))
    padded = torch.nn.functional.pad(x, (3, 0))
    want = torch.stack([(padded[..., t : t + 4] * w[:, 0]).sum(-1) + b for t in range(x.shape[-1])], -1)
    torch.testing.assert_close(spec.run(inputs)[0].double(), want, atol=1e-5, rtol=1e-5)
    spec = catalogue.OPS["conv2d"]
    inputs = build_inputs(spec, 2, torch.float32, seed=5, hidden=64)
    img, w, b = (t.double() for t in (inputs.batched["input"], inputs.fixed["weight"], inputs.fixed["bias"]))
    tiles = img.unfold(2, 16, 16).unfold(3, 16, 16)  # (2, 3, 4, 4, 16, 16)
    want = torch.einsum("bcijkl,fckl->bfij", tiles, w) + b[None, :, None, None]
    torch.testing.assert_close(spec.run(inputs)[0].double(), want, atol=1e-5, rtol=1e-5)


def test_grouped_mm_is_batch_and_position_invariant_only_under_the_mode() -> None:
    """torch's CPU grouped GEMM is one mm per expert, so a token's bits change with how many
    tokens share its expert; under the mode they do not."""
    spec = catalogue.OPS["grouped_mm"]
    cfg = _cfg(ops=("grouped_mm",), hidden=256, batch_sizes=(1, 2, 4, 8, 16, 32, 64))
    detkit_checks = audit_one(spec, "detkit", "float32", cfg, torch.device("cpu"))["checks"]
    assert all(detkit_checks[c]["verdict"] == "pass" for c in ("batch-variance", "batch-position")), detkit_checks
    torch_checks = audit_one(spec, "torch", "float32", cfg, torch.device("cpu"))["checks"]
    assert torch_checks["batch-variance"]["verdict"] == "fail", torch_checks["batch-variance"]


def test_torchs_bilinear_resize_is_thread_variant_and_the_modes_is_not() -> None:
    """An RGB image's bilinear resize: torch's CPU kernel takes another formula on one
    thread than on several (measured with torch 2.13: about half the outputs differ), so
    the audit's thread check fails for torch; under the mode every check passes, for the
    GLM-4V-style bicubic grid_sample too."""
    cfg = _cfg(ops=("interpolate", "grid_sample"), hidden=256, batch_sizes=(1, 2, 3, 5))
    torch_checks = audit_one(catalogue.OPS["interpolate"], "torch", "float32", cfg, torch.device("cpu"))["checks"]
    assert torch_checks["thread-variance"]["verdict"] == "fail", torch_checks["thread-variance"]
    for name in ("interpolate", "grid_sample"):
        checks = audit_one(catalogue.OPS[name], "detkit", "float32", cfg, torch.device("cpu"))["checks"]
        ran = {check: c["verdict"] for check, c in checks.items() if c["verdict"] not in ("n/a", "skipped")}
        assert set(ran) >= {"run-to-run", "batch-variance", "batch-position", "thread-variance"}, (name, checks)
        assert set(ran.values()) == {"pass"}, (name, checks)


def test_ties_inputs_really_tie() -> None:
    spec = catalogue.OPS["argmax"]
    x = build_inputs(spec, 2, torch.float32, 0, 64).batched["input"]
    assert ((x == x.max(dim=-1, keepdim=True).values).sum(dim=-1) > 1).all()


def test_resolve_ops_unknown_and_alias() -> None:
    assert [s.name for s in resolve_ops(["sdpa", "mm"])] == ["mm", "scaled_dot_product_attention"]
    with pytest.raises(InputError, match="unknown op 'nope'.*--list-ops"):
        resolve_ops(["nope"])


def test_opspec_validates() -> None:
    with pytest.raises(ValueError, match="family"):
        OpSpec("x", "bogus", "", lambda *a: Inputs({}), lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch size"):
        Inputs({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})


# --- comparison ----------------------------------------------------------------------------


@given(
    values=st.lists(st.floats(-(2.0**100), 2.0**100, width=32).filter(lambda v: abs(v) > 2.0**-100),
                    min_size=1, max_size=64),
    steps=st.integers(1, 1000),
    pick=st.integers(0, 63),
)
def test_compare_counts_bits_and_ulps(values: list[float], steps: int, pick: int) -> None:
    ref = torch.tensor(values, dtype=torch.float32)
    i = pick % ref.numel()
    moved = ref.clone()
    # move one element `steps` floats away from zero (same sign, so exactly `steps` ULPs)
    moved.view(torch.int32)[i] += steps
    c = compare((moved,), (ref,))
    assert (c.compared, c.differing, c.max_ulp) == (ref.numel(), 1, steps)
    assert sum(c.buckets.values()) == 1
    same = compare((ref.clone(),), (ref,))
    assert same.equal and same.max_ulp is None


def test_compare_signed_zero_and_indices() -> None:
    c = compare((torch.tensor([0.0, 1.0]),), (torch.tensor([-0.0, 1.0]),))
    assert c.differing == 1 and c.max_ulp == 0  # bits differ, value distance 0
    idx = compare((torch.tensor([3, 1]),), (torch.tensor([2, 1]),))
    assert idx.differing == 1 and idx.max_ulp is None
    bf = compare((torch.tensor([1.0078125], dtype=torch.bfloat16),), (torch.tensor([1.0], dtype=torch.bfloat16),))
    assert bf.max_ulp == 1


# --- checks on synthetic defects -----------------------------------------------------------


def test_row_wise_op_passes_every_check() -> None:
    checks = _checks(_spec("rowwise", lambda input: input * 2.0 + 1.0))
    for name in ("run-to-run", "batch-variance", "batch-position"):
        assert checks[name]["verdict"] == "pass", name
    assert checks["batch-variance"]["variants"] == 1
    assert checks["padding"]["verdict"] == "n/a"
    assert checks["isa-variance"]["verdict"] == "skipped"


@pytest.mark.parametrize("row", [0, 1, 2])
@pytest.mark.parametrize("threshold", [2, 3, 5, 8])
def test_batch_variance_finds_the_first_b_on_any_row(row: int, threshold: int) -> None:
    # Row `row` changes by one ULP once the batch has `threshold` rows or more.
    def call(input: torch.Tensor) -> torch.Tensor:
        out = input.clone()
        if input.shape[0] >= threshold and input.shape[0] > row:
            out.view(torch.int32)[row] += 1
        return out

    res = _checks(_spec("variant", call))["batch-variance"]
    # the row's reference is the row alone (b=1), so the change shows at the first b
    # holding the row that is past the threshold, even when the row first appears there
    assert res["verdict"] == "fail"
    assert res["first_b"] == min(b for b in SIZES if b >= threshold and b > row)
    assert res["max_ulp"] == 1
    assert res["variants"] == (2 if row == 0 else 1)


def test_a_row_that_differs_from_itself_alone_where_it_first_appears_is_caught() -> None:
    # As torch.addmm in bfloat16 on an AVX-512 EPYC: row 6 first sits in the sweep at b=8
    # and already differs there from row 6 computed alone. Compared only with its result
    # at b=8 it looked invariant.
    def call(input: torch.Tensor) -> torch.Tensor:
        out = input.clone()
        if input.shape[0] > 6:
            out.view(torch.int32)[6] += 1
        return out

    res = _checks(_spec("late_row", call))["batch-variance"]
    assert res["verdict"] == "fail" and res["first_b"] == 8 and res["differing"] == 16


@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=6, unique=True).map(sorted),
    pattern=st.dictionaries(st.tuples(st.integers(1, 9), st.integers(0, 8)), st.integers(1, 3), max_size=12),
)
def test_batch_sweep_matches_a_brute_force_count(sizes: list[int], pattern: dict[tuple[int, int], int]) -> None:
    """Row i at batch size b is moved pattern[(b, i)] ULPs; the sweep must count exactly what differs."""
    width = 4

    def call(input: torch.Tensor) -> torch.Tensor:
        out = input.clone()
        b = input.shape[0]
        for i in range(b):
            out.view(torch.int32)[i] += pattern.get((b, i), 0)
        return out

    res = audit_one(_spec("pattern", call, width=width), "torch", "float32",
                    _cfg(batch_sizes=tuple(sizes)), torch.device("cpu"))["checks"]["batch-variance"]
    differing, first = 0, None
    alone = pattern.get((1, 0), 0)  # every row computed alone is row 0 of a batch of 1
    for b in sizes:
        for i in range(b):
            if b > 1 and pattern.get((b, i), 0) != alone:
                differing += width
                first = b if first is None else min(first, b)
    assert res["differing"] == differing
    assert res["first_b"] == first
    assert res["verdict"] == ("fail" if differing else "pass")
    row0 = {pattern.get((b, 0), 0) for b in sizes}
    assert res["variants"] == len(row0)


def test_position_dependence_is_caught() -> None:
    def call(input: torch.Tensor) -> torch.Tensor:
        return input + torch.arange(input.shape[0], dtype=input.dtype)[:, None]

    checks = _checks(_spec("positional", call))
    assert checks["batch-position"]["verdict"] == "fail"
    # row i in a batch sits at position i, alone at position 0: its bits change too
    assert checks["batch-variance"]["verdict"] == "fail" and checks["batch-variance"]["first_b"] == 2


def test_run_to_run_nondeterminism_is_caught() -> None:
    calls = {"n": 0}

    def call(input: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return input + calls["n"]

    res = _checks(_spec("counter", call), runs=4)["run-to-run"]
    assert res["verdict"] == "fail" and [p["run"] for p in res["per"]] == [2, 3, 4]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 torch threads")
def test_thread_dependence_is_caught_and_threads_restored() -> None:
    before = torch.get_num_threads()
    res = _checks(_spec("threads", lambda input: input * torch.get_num_threads()))["thread-variance"]
    assert res["verdict"] == "fail"
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 torch threads")
def test_thread_dependence_at_small_batches_only_is_caught() -> None:
    # As torch's sum of one long row (hidden 65536): with one output element the reduction
    # is split across threads, with several the rows are, so only b=1 depends on threads.
    def call(input: torch.Tensor) -> torch.Tensor:
        return input * torch.get_num_threads() if input.shape[0] == 1 else input * 1.0

    res = _checks(_spec("small_b_threads", call))["thread-variance"]
    assert res["verdict"] == "fail"
    assert [p["b"] for p in res["per"] if p["differing"]] == [1]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 torch threads")
def test_one_thread_holds_when_numba_launches_its_threads_during_the_check() -> None:
    # numba imported but its threading layer not launched yet (as in `detkit audit`, whose
    # fingerprint imports numba): numba's first set_num_threads starts its OpenMP layer,
    # which reset OpenMP to NUMBA_NUM_THREADS after torch.set_num_threads(1), so the
    # "1 thread" side ran on all threads and the check compared all threads with themselves.
    code = (
        "import numba, numpy as np, torch\n"
        "from detkit.audit.catalogue import Inputs, OpSpec\n"
        "from detkit.audit.runner import AuditConfig, audit_one\n"
        "def build(b, dt, g, h):\n"
        "    return Inputs({'input': torch.from_numpy(g.standard_normal((b, 4), dtype=np.float32))})\n"
        "spec = OpSpec('threads', 'reduction', 's', build, lambda input: input * torch.get_num_threads())\n"
        "cfg = AuditConfig(ops=('sum',), impls=('torch',), batch_sizes=(1, 2), runs=2, hidden=64)\n"
        "print(audit_one(spec, 'torch', 'float32', cfg, torch.device('cpu'))['checks']['thread-variance']['verdict'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
    env.pop("NUMBA_THREADING_LAYER", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fail"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 torch threads")
def test_a_part_that_raises_marks_only_its_own_check() -> None:
    def call(input: torch.Tensor) -> torch.Tensor:
        if torch.get_num_threads() == 1:
            raise RuntimeError("no single-thread kernel")
        return input * 2.0

    checks = _checks(_spec("picky", call))
    assert checks["thread-variance"]["verdict"] == "error"
    assert "no single-thread kernel" in checks["thread-variance"]["note"]
    assert checks["batch-variance"]["verdict"] == checks["run-to-run"]["verdict"] == "pass"


def test_an_isa_that_differs_is_a_finding_even_when_another_isas_worker_failed(tmp_path: Path) -> None:
    spec = _spec("doubling", lambda input: input * 2.0)
    cfg = _cfg(isa=True)
    here = spec.run(build_inputs(spec, max(SIZES), torch.float32, cfg.seed, cfg.hidden))
    differs, crashed = tmp_path / "default", tmp_path / "avx2"
    differs.mkdir()
    crashed.mkdir()
    torch.save([o + 1.0 for o in here], differs / "doubling.torch.float32.pt")
    (crashed / "worker.err").write_text("Traceback ...\nMemoryError: out of memory")
    isa_dirs = {"default": (differs, "DEFAULT"), "avx2": (crashed, "AVX2")}
    res = audit_one(spec, "torch", "float32", cfg, torch.device("cpu"), isa_dirs)["checks"]["isa-variance"]
    # the difference found under default is kept, not hidden behind avx2's crash
    assert res["verdict"] == "fail" and res["differing"] == here[0].numel(), res
    assert "avx2: MemoryError: out of memory" in res["note"]
    # with nothing found, the crash makes the check an error
    torch.save(list(here), differs / "doubling.torch.float32.pt")
    res = audit_one(spec, "torch", "float32", cfg, torch.device("cpu"), isa_dirs)["checks"]["isa-variance"]
    assert res["verdict"] == "error" and "avx2: MemoryError" in res["note"], res


def test_torch_attention_padding_and_decode_checks_run() -> None:
    checks = _checks(catalogue.OPS["scaled_dot_product_attention"])
    for name in ("padding", "decode-prefill"):
        assert checks[name]["verdict"] in ("pass", "fail")
        assert checks[name]["compared"] > 0


def test_real_mm_finding_on_this_cpu() -> None:
    """torch.mm fp32 at K=N=4096 is batch variant on the CPUs this project is measured on."""
    res = audit_one(catalogue.OPS["mm"], "torch", "float32", _cfg(batch_sizes=(1, 2, 3, 4, 5, 8), hidden=4096),
                    torch.device("cpu"))["checks"]["batch-variance"]
    assert res["verdict"] == "fail" and res["first_b"] is not None and res["max_ulp"] >= 1


# --- runner --------------------------------------------------------------------------------


def test_an_op_that_raises_is_recorded_and_the_audit_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(input: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    bad = _spec("boom", boom)
    monkeypatch.setitem(catalogue.OPS, "boom", bad)
    monkeypatch.setattr(catalogue, "CATALOGUE", (bad, *catalogue.CATALOGUE))
    cfg = _cfg(ops=("boom", "sum"))
    writer = ReportWriter("audit", cfg.to_dict(), tmp_path / "report.json")
    records = run_audit(cfg, writer)
    assert [(r["op"], r["status"]) for r in records] == [("boom", "error"), ("sum", "ok")]
    assert "kernel exploded" in records[0]["error"]
    assert all(c["verdict"] == "error" for c in records[0]["checks"].values())
    saved = load_report(tmp_path / "report.json")
    assert [r["op"] for r in saved["results"] if r["record"] == "op"] == ["boom", "sum"]
    assert any("boom" in e["where"] for e in saved["errors"])


def test_a_result_json_cannot_hold_is_refused_and_the_report_goes_on(tmp_path: Path) -> None:
    # appended first, it made every later flush raise: the file stayed "running" and lost the rest
    import enum

    class Colour(enum.Enum):
        RED = 1

    writer = ReportWriter("pytest", {}, tmp_path / "report.json")
    writer.add_result({"test": "t", "type": "record", "name": "first"})
    with pytest.raises(TypeError, match="cannot be written to a JSON report"):
        writer.add_result({"test": "t", "type": "record", "name": Colour.RED})
    writer.add_result({"test": "t", "type": "record", "name": "third"})
    writer.finish({})
    saved = load_report(tmp_path / "report.json")
    assert saved["status"] == "complete" and [r["name"] for r in saved["results"]] == ["first", "third"]


def test_a_report_is_synced_to_disk_before_it_replaces_the_old_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from detkit import report

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str | Path) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "fsync", fsync)
    monkeypatch.setattr(report.os, "replace", replace)
    path = tmp_path / "report.json"
    report.write_json_atomic(path, {"n": 1})
    assert [e[0] for e in events] == ["fsync", "replace"]
    assert events[0][1] == events[1][1] != str(path)  # the temporary file, synced, then renamed
    assert json.loads(path.read_text()) == {"n": 1}


def test_unavailable_impl_is_recorded_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise BackendUnavailable("no kernels here")

    monkeypatch.setitem(impls.FACTORIES, "portable", broken)
    writer = ReportWriter("audit", {})
    run_audit(_cfg(impls=("torch", "portable")), writer)
    avail = [r for r in writer.data["results"] if r["record"] == "impl"]
    assert {r["impl"]: r["available"] for r in avail} == {"torch": True, "portable": False}
    assert "no kernels here" in avail[1]["reason"]
    assert {r["impl"] for r in writer.data["results"] if r["record"] == "op"} == {"torch"}
    assert any("portable" in line for line in summarize(writer.data)["advice"])
    with pytest.raises(BackendUnavailable, match="portable"):
        run_audit(_cfg(impls=("torch", "portable"), impls_explicit=True), ReportWriter("audit", {}))


def test_deterministic_impl_restores_state_even_on_error() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    had_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(RuntimeError):
        with impls.context("deterministic"):
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
            raise RuntimeError("inside")
    assert not torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == had_env


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(batch_sizes=(4,)), "at least two"),
        (dict(batch_sizes=(0, 2)), "from 1 to"),
        (dict(batch_sizes=(2, 2)), "without repeats"),
        (dict(batch_sizes=(4, 2)), "increasing"),
        (dict(runs=1), "at least 2"),
        (dict(dtypes=("int8",)), "unknown dtype"),
        (dict(dtypes=()), "no dtypes selected"),
        (dict(impls=()), "no implementations selected"),
        (dict(impls=("magic",)), "unknown implementation"),
        (dict(ops=("nope",)), "unknown op"),
        (dict(fail_on=("speed",)), "unknown check"),
        (dict(fail_on=("isa-variance",)), "needs --isa"),
        (dict(device="tpu"), "unknown device"),
        (dict(device="cuda", isa=True), "--isa compares CPU instruction sets"),
        (dict(device="cuda", isa=True, fail_on=("isa-variance",)), "applies to --device cpu only"),
    ],
)
def test_config_rejects_bad_input(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        _cfg(**kw)


def test_parsers() -> None:
    assert parse_batch_sizes("8, 1,2") == (1, 2, 8)
    with pytest.raises(InputError, match="integers"):
        parse_batch_sizes("1,two")
    assert parse_fail_on("any", isa=True) == CHECKS
    assert parse_fail_on("any") == tuple(c for c in CHECKS if c != "isa-variance")
    assert parse_fail_on("batch-variance,run-to-run") == ("batch-variance", "run-to-run")
    with pytest.raises(InputError, match="unknown check"):
        parse_fail_on("batch")
    with pytest.raises(InputError, match="unknown check 'batch-varaince'"):
        parse_fail_on("any,batch-varaince")
    # named explicitly next to any: kept, so that AuditConfig asks for --isa
    assert "isa-variance" in parse_fail_on("any,isa-variance")
    with pytest.raises(InputError, match="needs --isa"):
        _cfg(fail_on=parse_fail_on("any,isa-variance"))
    assert impls.parse_impls(None) == list(impls.IMPLS)
    with pytest.raises(InputError, match="unknown implementation"):
        impls.parse_impls("torch,cublas")


# --- summary and rendering -----------------------------------------------------------------


def _record(op: str, impl: str, **verdicts: str) -> dict[str, Any]:
    checks = {c: {"verdict": "pass", "differing": 0, "compared": 10, "max_ulp": None, "first_b": None,
                  "ulp_hist": [], "per": [], "note": ""} for c in CHECKS}
    for key, verdict in verdicts.items():
        name = key.replace("_", "-")
        checks[name].update(verdict=verdict)
        if verdict == "fail":
            checks[name].update(differing=4, max_ulp=3, first_b=2 if name == "batch-variance" else None,
                                ulp_hist=[[1, 1], [2, 3]])
    return {"record": "op", "op": op, "impl": impl, "dtype": "float32", "status": "ok", "checks": checks,
            "seconds": 0.1}


def test_advice_names_the_ops_and_the_fix() -> None:
    records = [_record("mm", "torch", batch_variance="fail"), _record("mm", "detkit"),
               _record("sum", "torch"), _record("sum", "detkit")]
    lines = advice(records, [], "cpu")
    assert any(line.startswith("mm: batch variant") and "detkit.batch_invariant()" in line for line in lines)
    assert not any("sum" in line for line in lines)
    broken = advice([_record("mm", "torch", batch_variance="fail"), _record("mm", "detkit", batch_variance="fail")],
                    [], "cpu")
    assert any("meant to guarantee" in line for line in broken)
    gpu = advice([_record("mm", "torch", run_to_run="fail"), _record("mm", "deterministic")], [], "cuda")
    assert any("CUBLAS_WORKSPACE_CONFIG=:4096:8" in line for line in gpu)
    assert advice([_record("sum", "torch")], [], "cpu") == [
        "Every audited op passed every check it was run through."]


def test_advice_of_an_interrupted_audit_keeps_findings_not_yet_measured_under_the_mode() -> None:
    """Interrupted after linear [torch] failed but before linear [detkit] ran: the finding
    stays in the advice (it used to say every op passed), and the first-b list names only
    the ops of its own line."""
    records = [_record("bmm", "torch"), _record("bmm", "detkit"), _record("linear", "torch", batch_variance="fail")]
    lines = advice(records, [], "cpu")
    assert lines == ["linear: batch variant (a row's bits change with the batch size) here (a row first changes at "
                     "b=2 for linear); detkit.batch_invariant() is meant to fix this (not measured under it in this "
                     "report)."]
    records = [_record("mm", "torch", batch_variance="fail"), _record("mm", "detkit"),
               _record("addmm", "torch", batch_variance="fail")]
    mm_line, addmm_line = advice(records, [], "cpu")
    assert mm_line.startswith("mm: ") and "for addmm" not in mm_line
    assert addmm_line.startswith("addmm: ") and "b=2 for addmm" in addmm_line
    nd = advice([_record("mm", "torch", run_to_run="fail")] + [_record("mm", "detkit")]
                + [_record("sum", "torch"), _record("sum", "deterministic")], [], "cpu")
    assert nd == ["mm: run-to-run nondeterministic (the same call gives different bits); not measured under "
                  "torch.use_deterministic_algorithms(True) in this report."]


def test_advice_says_which_passes_under_the_mode_are_torchs() -> None:
    """An op the mode does not override shows "ok" under detkit in the table: the advice
    says that pass is torch's kernel on this machine, not a detkit guarantee."""
    routed = {**_record("sum", "detkit"), "coverage": {"routed": {"sum.dim_IntList": 3}, "fell_back": {}}}
    unrouted = {**_record("cumsum", "detkit"), "coverage": {"routed": {}, "fell_back": {}}}
    lines = advice([_record("sum", "torch"), routed, _record("cumsum", "torch"), unrouted], [], "cpu")
    assert lines == ["cumsum: not covered by detkit.batch_invariant() (torch's own kernel ran): their passing "
                     "verdicts there are torch's behaviour on this machine, not a detkit guarantee."]
    # both modes leave it to torch: one line naming both
    both = advice([_record("cumsum", "torch"), unrouted, {**unrouted, "impl": "portable"}], [], "cpu")
    assert both == ["cumsum: not covered by detkit.batch_invariant() or detkit.batch_invariant(portable=True) "
                    "(torch's own kernel ran): their passing verdicts there are torch's behaviour on this machine, "
                    "not a detkit guarantee."]


def test_fail_on_counts_errors_as_failures() -> None:
    records = [_record("mm", "torch", batch_variance="error"), _record("sum", "torch", run_to_run="fail")]
    assert fail_on_failures(records, ["batch-variance"]) == ["mm [torch, float32]: batch-variance (error)"]
    assert fail_on_failures(records, ["thread-variance"]) == []


def _report(status: str = "complete") -> dict[str, Any]:
    records = [_record("mm", "torch", batch_variance="fail", thread_variance="fail"), _record("mm", "detkit"),
               _record("topk", "torch")]
    data = {"schema": "detkit.report", "kind": "audit", "status": status, "config": {"device": "cpu"},
            "fingerprint": {"versions": {"torch": "x"}}, "results": records, "errors": []}
    data["summary"] = summarize(data, ["batch-variance"])
    return data


def test_a_gated_check_that_was_skipped_is_named() -> None:
    # with one thread (OMP_NUM_THREADS=1 in CI) thread-variance is skipped and never fails
    record = _record("mm", "torch")
    record["checks"]["thread-variance"].update(verdict="skipped", note="torch runs with 1 thread here")
    summary = summarize({"results": [record]}, ["thread-variance", "batch-variance"])
    assert summary["fail_on"]["passed"] is True
    assert summary["fail_on"]["skipped"] == {"thread-variance": "torch runs with 1 thread here"}
    assert summary["advice"][0].startswith("--fail-on thread-variance: not measured (torch runs with 1 thread")


def test_markdown_has_every_record_and_the_verdicts() -> None:
    md = to_markdown(_report())
    assert md.count("| mm |") == 2 and "| topk |" in md
    assert "**FAIL from b=2, max 3 ULP**" in md
    assert "FAILED" in md  # --fail-on line
    assert "PARTIAL" in to_markdown(_report("partial"))
    assert "INCOMPLETE" in to_markdown(_report("running"))


def test_html_is_self_contained_with_heat_map_and_histograms() -> None:
    page = to_html(_report())
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "@import" not in page and "url(" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 1 + 2  # heat map + one histogram per failed check with ULPs
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML
    assert "aria-label=\"heat map op x check\"" in page


def test_heat_map_has_one_cell_per_op_impl_check() -> None:
    records = _report()["results"]
    svg = heat_map_svg(records, list(CHECKS[:3]))
    root = ET.fromstring(svg)
    rects = root.findall(".//{http://www.w3.org/2000/svg}rect")
    # ops {mm, topk} x impls {torch, detkit} x 3 checks (topk has no detkit record: "not run" cell)
    assert len(rects) == 2 * 2 * 3
    assert ulp_histogram_svg([], "empty") == ""
    assert short_cell({"verdict": "fail", "first_b": 4}, "batch-variance")[0] == "FAIL b>=4"


def test_report_schema_doc_exists_and_names_the_fields() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "report-schema.md").read_text()
    for field in ("schema_version", "fingerprint", "first_b", "max_ulp", "ulp_hist", "partial", "record"):
        assert field in doc
    assert "probe" in doc and "pytest" in doc



def test_the_terminal_lists_the_errors_the_advice_points_to(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from detkit.cli import main

    def boom(input: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded [on purpose]")

    bad = _spec("boom", boom)
    monkeypatch.setitem(catalogue.OPS, "boom", bad)
    monkeypatch.setattr(catalogue, "CATALOGUE", (bad, *catalogue.CATALOGUE))
    monkeypatch.setattr(sys, "argv", ["detkit", "audit", "--ops", "boom", "--impl", "torch"])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr().out
    assert exc.value.code in (0, None)  # errors are reported, not gated on without --fail-on
    assert "see the errors section" in out
    assert "errors (" in out and "kernel exploded [on purpose]" in out  # brackets printed as text


def _live_table_of_an_op_that_changes_from(first_b: int, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The terminal lines of ``detkit audit`` over an op whose row 0 changes from b=first_b."""
    import sys

    from detkit.cli import main

    def late(input: torch.Tensor) -> torch.Tensor:
        out = input.clone()
        if input.shape[0] >= first_b:
            out.view(torch.int32)[0] += 1
        return out

    spec = _spec("late", late)
    monkeypatch.setitem(catalogue.OPS, "late", spec)
    monkeypatch.setattr(catalogue, "CATALOGUE", (spec, *catalogue.CATALOGUE))
    monkeypatch.setattr(sys, "argv", ["detkit", "audit", "--ops", "late", "--impl", "torch",
                                      "--batch-sizes", f"1,2,{first_b}", "--runs", "2"])
    with pytest.raises(SystemExit):
        main()
    return capsys.readouterr().out.splitlines()


def test_the_live_table_keeps_a_space_between_full_width_cells(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = _live_table_of_an_op_that_changes_from(16, monkeypatch, capsys)  # "FAIL b>=16", 10 characters
    line = next(x for x in lines if x.startswith("late"))
    assert "FAIL b>=16 " in line, line


def test_a_tiny_share_of_differing_elements_fits_the_live_tables_cell() -> None:
    # 1 element of a million: "FAIL 0.0001%" (12 characters) ran into the next column
    text, _style = short_cell({"verdict": "fail", "compared": 1_048_576, "differing": 1}, "run-to-run")
    assert text == "FAIL <.01%"
    assert short_cell({"verdict": "fail", "compared": 10_000, "differing": 2}, "run-to-run")[0] == "FAIL 0.02%"


def test_the_live_table_keeps_a_space_after_a_three_digit_first_b(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    lines = _live_table_of_an_op_that_changes_from(128, monkeypatch, capsys)  # the cuda sweep goes to 256
    header = next(x for x in lines if x.startswith("op "))
    line = next(x for x in lines if x.startswith("late"))
    assert "FAIL b>=128 " in line, line
    # every cell starts under its column's name
    assert line.index("FAIL b>=128") == header.index("batch"), (header, line)
