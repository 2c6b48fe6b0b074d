"""The detkit pytest plugin, driven through pytester (mostly in-process runs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Imported here so that pytester's in-process runs (which drop modules first imported
# inside them) reuse them instead of importing torch, the mode or transformers again.
import torch  # noqa: F401
import torch._dynamo  # noqa: F401  (the mode sets the compiler's stance; its modules register torch libraries once)
import detkit._testing_deterministic  # noqa: F401
import detkit._testing_fixture  # noqa: F401
import detkit._testing_generation  # noqa: F401
import detkit._testing_policy  # noqa: F401
import detkit.mode  # noqa: F401
import detkit.models  # noqa: F401
import detkit.testing  # noqa: F401
from detkit.report import load_report

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _numba_runtime_loaded_outside_pytester() -> None:
    """numba loads its runtime and typing registries (and llvmlite.ir) at its first compile
    or cache load. Done inside an in-process run, those modules were dropped after it while
    numba's C extension kept the old ones, and the next kernel failed in llvmlite
    (``assert isinstance(typ, types.Type)``) whenever these tests ran before any other
    test had used a kernel (``-k report``)."""
    from detkit import kernels

    kernels.mean(torch.ones(1, 4), -1)

HEADER = """
import random
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detkit.testing import assert_batch_invariant, assert_deterministic

W = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
X = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))

def linear(t):
    return F.linear(t, W)

def random_order_sum(v):
    # Genuinely nondeterministic: the summation order comes from OS entropy. A sequential
    # float32 sum (numpy's accumulate; torch's CPU sums accumulate wider) of 10^6 values
    # takes hundreds of distinct values over random orders, so 4 runs agreeing by chance
    # (which 300 values allowed now and then) is out of reach.
    perm = np.random.default_rng(random.SystemRandom().getrandbits(64)).permutation(v.shape[0])
    return torch.from_numpy(np.add.accumulate(v.numpy()[perm])[-1:]).reshape(())
"""


def _run(pytester: pytest.Pytester, body: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=HEADER + textwrap.dedent(body))
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


def test_options_are_grouped_with_defaults_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--help")
    out = result.stdout.str()
    assert "detkit: determinism and batch invariance:" in out
    assert "--detkit-mode={off,batch-invariant,portable}" in out
    assert "--detkit-report=PATH" in out
    assert "Default: off." in out and "Default: no report." in out


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    out = pytester.runpytest_inprocess("--markers").stdout.str()
    assert "@pytest.mark.batch_invariant(portable=False, strict=False)" in out
    assert "@pytest.mark.portable(strict=False)" in out
    assert "@pytest.mark.deterministic(runs=3, restore_rng=True)" in out
    result = _run(
        pytester,
        """
        @pytest.mark.batch_invariant
        @pytest.mark.deterministic(runs=2)
        def test_marked():
            return torch.ones(2)
        """,
        "--strict-markers",
    )
    result.assert_outcomes(passed=1)


def test_passing_and_failing_checks_messages_and_summary(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        def test_invariant():
            assert_batch_invariant(torch.exp, X, batch_sizes=[1, 2, 5])

        def test_variant():
            assert_batch_invariant(linear, X, batch_sizes=[1, 2, 4])

        def test_expected_variant():
            with pytest.raises(AssertionError):
                assert_batch_invariant(linear, X, batch_sizes=[2])
        """,
    )
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    # __tracebackhide__: the user's line is shown, not detkit's internals.
    result.stdout.fnmatch_lines([">       assert_batch_invariant(linear, X, batch_sizes=[1, 2, 4])"])
    assert "detkit/testing.py" not in out
    result.stdout.fnmatch_lines(
        [
            "E       detkit.testing.BatchVariance: BATCH-VARIANT: linear: * of 20 placements (*%) differ bitwise*",
            "E         batch size  placements  differing  rows differing  max ULP",
            "E       First difference: row * of x at position * of a batch of *",
            "E       * of 64 elements differ bitwise (*%); max ULP *",
            "E       What to try: wrap the call in `with detkit.batch_invariant():`*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*= detkit =*",
            "test * outcome * checks * verdicts * worst ULP",
            "test_user.py::test_variant * failed (BATCH-VARIANT) * 1 * 1 BATCH-VARIANT *",
            "test_user.py::test_expected_variant * passed * 1 * 1 BATCH-VARIANT *",
            "test_user.py::test_invariant * passed * 1 * 1 PASS * 0",
            "detkit: 3 checks in 3 tests: 1 passed, 2 failed (2 BATCH-VARIANT); tests failing on a detkit check: 1; worst ULP *; mode off",
        ]
    )


def test_report_file(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        def test_checks(detkit):
            detkit.assert_batch_invariant(torch.tanh, X, batch_sizes=[2, 3])
            detkit.record("logits", X * 2)
            with pytest.raises(AssertionError):
                detkit.assert_deterministic(random_order_sum, torch.randn(1_000_000), runs=3)

        def test_failing():
            assert_deterministic(random_order_sum, torch.randn(1_000_000), runs=3)

        def test_unrelated():
            pass
        """,
        "--detkit-report=out/report.json",
    )
    result.assert_outcomes(passed=2, failed=1)
    report = load_report(pytester.path / "out" / "report.json")
    assert report["kind"] == "pytest" and report["status"] == "complete"
    assert report["config"]["mode"] == "off"
    assert "python" in json.dumps(report["fingerprint"]).lower()
    checks = [r for r in report["results"] if r["type"] == "check"]
    assert [(c["test"], c["check"], c["verdict"]) for c in checks] == [
        ("test_user.py::test_checks", "batch_invariant", "PASS"),
        ("test_user.py::test_checks", "deterministic", "NONDETERMINISTIC"),
        ("test_user.py::test_failing", "deterministic", "NONDETERMINISTIC"),
    ]
    assert checks[1]["detail"]["distinct_results"] >= 2 and checks[1]["worst_ulp"] >= 1
    assert "NONDETERMINISTIC" in checks[1]["message"]
    (record,) = [r for r in report["results"] if r["type"] == "record"]
    assert record["name"] == "logits" and len(record["outputs"][0]["sha256"]) == 64
    outcomes = {r["test"]: (r["outcome"], r["failed_check"]) for r in report["results"] if r["type"] == "test"}
    assert outcomes == {
        "test_user.py::test_checks": ("passed", None),
        "test_user.py::test_failing": ("failed", "NONDETERMINISTIC"),
    }
    summary = report["summary"]
    assert (summary["checks"], summary["passed"], summary["failed"]) == (3, 1, 2)
    assert summary["verdicts"] == {"PASS": 1, "NONDETERMINISTIC": 2} and summary["exitstatus"] == 1
    result.stdout.fnmatch_lines(["detkit: 3 checks in 2 tests: *; report out/report.json"])
    # `detkit report` renders it as tables (failures first), not as JSON lines
    from detkit._testing_render import to_html, to_markdown

    md = to_markdown(report)
    assert "2 failed (2 NONDETERMINISTIC); worst ULP" in md and "pytest exit status 1" in md
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith("| test_")]
    # full node ids (two files may hold tests of one name), the test's outcome, the verdict
    assert [(r[0], r[1], r[4]) for r in rows[:3]] == [
        ("| test_user.py::test_checks", "passed", "NONDETERMINISTIC"),  # inside pytest.raises
        ("| test_user.py::test_failing", "failed", "NONDETERMINISTIC"),
        ("| test_user.py::test_checks", "passed", "PASS"),
    ]
    assert "| test_user.py::test_checks | logits | " in md and record["outputs"][0]["sha256"][:12] in md
    page = to_html(report)
    assert page.count("<table>") == 2 and "NONDETERMINISTIC" in page and "{" not in page.split("<body>")[1]


def test_report_path_that_cannot_be_written_is_a_usage_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "blocker").write_text("a file, not a directory")
    result = _run(pytester, "def test_x():\n    pass\n", "--detkit-report=blocker/report.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--detkit-report=blocker/report.json: cannot write the report*"])


def test_deterministic_marker_catches_random_order_and_never_retries(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        CALLS = []

        @pytest.mark.deterministic(runs=4)
        def test_sum(detkit):
            CALLS.append(1)
            v = torch.randn(1_000_000)  # same draws every run: RNG states are restored
            detkit.record("sum", random_order_sum(v))

        def test_ran_exactly_four_times():
            assert len(CALLS) == 4
        """,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E   detkit.testing.Nondeterminism: NONDETERMINISTIC: test_user.py::test_sum: * distinct results in 4 runs of the same test*Not retried*",
            "*run * differs from run 1 in detkit.record('sum'):",
            "*1 of 1 elements differ bitwise (100.0%); max ULP *",
        ]
    )
    result.stdout.fnmatch_lines(["test_user.py::test_sum * failed (NONDETERMINISTIC) *"])


def test_deterministic_marker_compares_return_values_and_records(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        RUNS = []

        @pytest.mark.deterministic(runs=3)
        def test_stable(detkit):
            x = torch.randn(8, 64)  # seeded draws repeat across runs
            detkit.record("hidden", torch.tanh(x))
            return linear(x), {"mean": x.mean()}

        @pytest.mark.deterministic(runs=3)
        def test_third_run_differs():
            RUNS.append(1)
            return torch.tensor([1.0, 2.0, 3.0 if len(RUNS) < 3 else 3.0000002])

        @pytest.mark.deterministic(runs=3)
        def test_second_run_raises():
            RUNS.append(1)
            assert len(RUNS) != 5, "flaky"
            return torch.ones(1)

        @pytest.mark.deterministic
        def test_nothing_to_compare():
            pass

        @pytest.mark.deterministic(runs=1)
        def test_bad_runs():
            return torch.ones(1)

        @pytest.mark.deterministic(5, runs=3)
        def test_runs_given_twice():
            return torch.ones(1)

        @pytest.mark.deterministic(runs=2)
        def test_seeded_draws_repeat():
            return torch.randn(3)

        @pytest.mark.deterministic(runs=2, restore_rng=False)
        def test_rng_consumption_counts():
            return torch.randn(3)
        """,
    )
    result.assert_outcomes(passed=2, failed=6)
    result.stdout.fnmatch_lines(["*NONDETERMINISTIC: test_user.py::test_rng_consumption_counts: 2 distinct results in 2 runs*"])
    result.stdout.fnmatch_lines(
        [
            "*NONDETERMINISTIC: test_user.py::test_third_run_differs: 2 distinct results in 3 runs*(1 of 2 reruns differ*",
            "*run 3 differs from run 1 in the return value:",
            "*1 of 3 elements differ bitwise (33.3%); max ULP 1,*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*NONDETERMINISTIC: test_user.py::test_second_run_raises: run 2 of 3 raised AssertionError while run 1 passed*"]
    )
    result.stdout.fnmatch_lines(["*test_nothing_to_compare returned nothing and recorded nothing*"])
    result.stdout.fnmatch_lines(["*deterministic(runs=...) needs an int >= 2, got 1*"])
    result.stdout.fnmatch_lines(["*deterministic takes runs= and restore_rng= only, got (5,), {'runs': 3}*"])
    assert "PytestReturnNotNoneWarning" not in result.stdout.str()


def test_deterministic_marker_does_not_compare_records_a_fixture_made_once_at_setup(pytester: pytest.Pytester) -> None:
    # The fixture runs once, before run 1: its record belongs to no run and must not make
    # every rerun look like it "returned" one output fewer.
    result = _run(
        pytester,
        """
        @pytest.fixture
        def weights(detkit):
            detkit.record("weights", W)
            return W

        @pytest.mark.deterministic(runs=3)
        def test_stable(detkit, weights):
            detkit.record("out", F.linear(X, weights))
            return X.sum()
        """,
    )
    result.assert_outcomes(passed=1)


def test_mode_markers_and_suite_mode(pytester: pytest.Pytester) -> None:
    body = """
        import detkit.mode

        @pytest.fixture
        def mode_in_setup():
            return detkit.mode.is_enabled()

        @pytest.mark.batch_invariant
        def test_marked(mode_in_setup):
            assert detkit.mode.is_enabled() and not detkit.mode.state().portable
            assert_batch_invariant(linear, X, batch_sizes=[1, 2, 4])

        @pytest.mark.portable
        def test_portable():
            assert detkit.mode.state().portable
            assert_batch_invariant(linear, X, batch_sizes=[1, 3])

        def test_plain(mode_in_setup):
            print("setup mode:", mode_in_setup, "body mode:", detkit.mode.is_enabled())
            assert_batch_invariant(linear, X, batch_sizes=[1, 2, 4])

        @pytest.mark.portable
        class TestClassMarked:
            @pytest.mark.batch_invariant(strict=True)
            def test_own_mark_wins(self):  # the function's own mark, not its class's
                assert detkit.mode.state().strict and not detkit.mode.state().portable
        """
    result = _run(pytester, body, "-s")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*setup mode: False body mode: False*"])
    assert not detkit.mode.is_enabled()  # restored after the run

    suite = _run(pytester, body, "-s", "--detkit-mode=batch-invariant")
    suite.assert_outcomes(passed=4)
    suite.stdout.fnmatch_lines(["detkit: mode batch-invariant", "*setup mode: True body mode: True*"])
    suite.stdout.fnmatch_lines(["detkit: 3 checks in 3 tests: 3 passed, 0 failed; *; mode batch-invariant"])
    assert not detkit.mode.is_enabled()


def test_markers_refuse_arguments_they_would_ignore(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import unittest

        @pytest.mark.batch_invariant(portabel=True)
        def test_misspelt():
            pass

        @pytest.mark.batch_invariant(True)
        def test_positional():
            pass

        @pytest.mark.portable(strict="yes")
        def test_not_a_bool():
            pass

        @pytest.mark.batch_invariant(portable=True, strict=True)
        def test_fine():
            pass

        class TestOld(unittest.TestCase):
            @pytest.mark.deterministic(runs=3)
            def test_method(self):
                return random_order_sum(torch.randn(1_000_000))
        """,
    )
    result.assert_outcomes(passed=1, failed=3, errors=1)
    out = result.stdout.str()
    for text in ("@pytest.mark.batch_invariant takes only portable=True/False, strict=True/False, got args () and "
                 "kwargs {'portabel': True}", "got args (True,) and kwargs {}",
                 "@pytest.mark.portable takes only strict=True/False, got args () and kwargs {'strict': 'yes'}",
                 "@pytest.mark.deterministic cannot rerun the unittest.TestCase method test_user.py::TestOld::test_method"):
        assert text in out, text


def test_a_test_whose_detkit_call_refused_its_arguments_is_listed(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        def test_one_row():
            assert_batch_invariant(torch.exp, X[:1], batch_sizes=[1, 2])
        """,
        "--detkit-report=r.json",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["test_user.py::test_one_row  failed (INPUT-ERROR)*",
                                 "*tests failing on a detkit check: 1;*"])
    (test,) = [r for r in load_report(pytester.path / "r.json")["results"] if r["type"] == "test"]
    assert (test["outcome"], test["failed_check"]) == ("failed", "INPUT-ERROR")


def test_the_line_for_summary_rows_left_out_does_not_call_failed_tests_passing(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        from detkit.testing import assert_bitwise_equal

        @pytest.mark.parametrize("i", range(32))
        def test_differs(i):
            assert_bitwise_equal(torch.tensor([float(i)]), torch.tensor([i + 0.5]))
        """,
    )
    result.assert_outcomes(failed=32)
    out = result.stdout.str()
    assert "passing detkit checks" not in out
    result.stdout.fnmatch_lines(["... 2 more tests (2 failed) (-v lists all)"])


def test_an_expected_failure_is_not_counted_as_a_failing_test(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        @pytest.mark.xfail(reason="known nondeterministic", strict=True)
        @pytest.mark.deterministic(runs=3)
        def test_known():
            return random_order_sum(torch.randn(1_000_000))
        """,
        "--detkit-report=r.json",
    )
    result.assert_outcomes(xfailed=1)
    result.stdout.fnmatch_lines(["test_user.py::test_known  xfailed (NONDETERMINISTIC)*",
                                 "detkit: 1 checks in 1 tests: 0 passed, 1 failed (1 NONDETERMINISTIC); "
                                 "tests failing on a detkit check: 0;*"])
    (test,) = [r for r in load_report(pytester.path / "r.json")["results"] if r["type"] == "test"]
    assert test["outcome"] == "xfailed"


def test_mode_coverage_is_recorded_in_the_report(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        @pytest.mark.batch_invariant
        def test_marked():
            linear(X)
        """,
        "--detkit-report=r.json",
    )
    result.assert_outcomes(passed=1)
    (entry,) = [r for r in load_report(pytester.path / "r.json")["results"] if r["type"] == "mode"]
    assert entry["test"] == "test_user.py::test_marked" and entry["when"] == "call"
    assert entry["routed"] >= 1 and entry["portable"] is False and entry["fell_back"] == {}
    assert entry["not_portable"] == {}


def test_portable_calls_torchs_math_library_computed_are_recorded(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        @pytest.mark.portable
        def test_activation():
            torch.nn.functional.mish(X), torch.sin(X)  # sin is a portable kernel, mish torch's
        """,
        "--detkit-report=r.json",
    )
    result.assert_outcomes(passed=1)
    (entry,) = [r for r in load_report(pytester.path / "r.json")["results"] if r["type"] == "mode"]
    assert entry["portable"] is True and list(entry["not_portable"]) == ["mish"], entry


def test_ops_that_fell_back_under_the_mode_are_listed(pytester: pytest.Pytester) -> None:
    # Complex matmul has no detkit kernel: torch's runs, and the summary must say so.
    result = _run(
        pytester,
        """
        @pytest.mark.batch_invariant
        def test_complex():
            a = torch.ones(4, 4, dtype=torch.complex64)
            assert_batch_invariant(lambda t: t @ a, a, batch_sizes=[2])
        """,
        "--detkit-report=r.json",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "detkit: in 1 tests under the mode, ops fell back to torch's kernels (no invariance guarantee for them):",
            "  test_user.py::test_complex: mm x*",
        ]
    )
    report = load_report(pytester.path / "r.json")
    assert report["summary"]["tests_with_uncovered_ops"] == 1


class _ModelPlugin:
    """Hands the outer session's model to the inner run (loading it there would redo imports)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model_obj = model

    @pytest.fixture
    def model(self) -> torch.nn.Module:
        return self.model_obj


def test_fixture_check_generation(pytester: pytest.Pytester) -> None:
    model = detkit.models.load_preset("tiny-llama")
    pytester.makepyfile(
        test_user=HEADER
        + textwrap.dedent(
            """
            from detkit.models import build_tokenizer

            PROMPTS = ["Hello", "The quick brown fox", "a"]

            @pytest.mark.batch_invariant
            def test_under_mode(detkit, model):
                detkit.check_generation(model, PROMPTS, batch_sizes=[1, 3], max_new_tokens=3, tokenizer=build_tokenizer())

            def test_without_mode(detkit, model):
                detkit.check_generation(model, PROMPTS, batch_sizes=[2], max_new_tokens=3, tokenizer=build_tokenizer(),
                                        padding_side="left")
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", plugins=[_ModelPlugin(model)])
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*BATCH-VARIANT: generation?LlamaForCausalLM?: of 4 batch placements of 3 prompts, * different logits*",
            "*First difference: prompt * at position * of a batch of 2, left-padded by *",
        ]
    )
    result.stdout.fnmatch_lines(["test_user.py::test_under_mode * passed * 1 * 1 PASS * 0"])


def test_fixture_check_sampler_trainer_is_reported(pytester: pytest.Pytester) -> None:
    model = detkit.models.load_preset("tiny-llama", attn_implementation="sdpa")
    pytester.makepyfile(
        test_user=HEADER
        + textwrap.dedent(
            """
            from detkit.models import build_tokenizer

            PROMPTS = ["Hello", "The quick brown fox", "a"]

            @pytest.mark.batch_invariant
            def test_on_policy(detkit, model):
                detkit.check_sampler_trainer(model, PROMPTS, max_new_tokens=3, tokenizer=build_tokenizer())

            def test_off_policy(detkit, model):
                detkit.check_sampler_trainer(model, PROMPTS, max_new_tokens=3, tokenizer=build_tokenizer())
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--detkit-report=r.json", plugins=[_ModelPlugin(model)])
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*MISMATCH: sampler-trainer?LlamaForCausalLM?: 3 prompts x 3 steps, * differ from the sampler's at *",
            "*First difference: prompt *, completion step *, trainer batch of * at position *, right-padded by *",
        ]
    )
    checks = {r["test"].rsplit("::", 1)[-1]: r for r in load_report(pytester.path / "r.json")["results"] if r["type"] == "check"}
    assert checks["test_on_policy"]["check"] == "sampler_trainer" and checks["test_on_policy"]["passed"]
    off = checks["test_off_policy"]
    assert off["verdict"] == "MISMATCH" and off["detail"]["kl_max"] > 0

    from detkit._testing_render import to_markdown

    text = to_markdown(load_report(pytester.path / "r.json"))
    step = off["detail"]["first_difference"]["step"]
    assert "| test_user.py::test_off_policy | failed | sampler_trainer | sampler-trainer[LlamaForCausalLM] | MISMATCH |" in text
    assert f"step {step}" in text


def test_disabled_with_p_no_detkit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_uses_fixture(detkit):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:detkit")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'detkit' not found*"])
    assert "= detkit =" not in result.stdout.str()
    usage = pytester.runpytest_inprocess("-p", "no:detkit", "--detkit-mode=portable")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR


def test_quiet_when_unused_and_imports_nothing_heavy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        import sys

        def test_light():
            heavy = [m for m in ("torch", "numpy", "detkit.testing", "transformers") if m in sys.modules]
            assert not heavy, heavy
        """
    )
    # A subprocess: this process has torch loaded already. Other plugins are blocked that
    # import numpy themselves (pytest-randomly seeds numpy's generator).
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "= detkit =" not in result.stdout.str()


def test_plugin_module_import_is_light() -> None:
    code = "import sys, detkit.pytest_plugin; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_example_user_project_passes(pytester: pytest.Pytester) -> None:
    # The example in examples/user_project is what the docs point users to: keep it green.
    # (Its generation test is covered by test_fixture_check_generation; skipped for time.)
    project = Path(__file__).resolve().parents[1] / "examples" / "user_project"
    result = pytester.runpytest_inprocess(str(project), "-p", "no:cacheprovider", "-k", "not generation")
    result.assert_outcomes(passed=7, deselected=1)
    result.stdout.fnmatch_lines(["detkit: 7 checks in 7 tests: 6 passed, 1 failed (1 BATCH-VARIANT); tests failing on a detkit check: 0;*"])


def test_suite_mode_needs_the_mode_module(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "detkit.mode", None)  # makes `import detkit.mode` fail
    pytester.makepyfile(test_user="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--detkit-mode=batch-invariant")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--detkit-mode=batch-invariant: detkit.batch_invariant is unavailable here*"])


def test_fixture_record_validates_and_reports_digests() -> None:
    from detkit._testing_fixture import DetkitFixture
    from detkit.errors import InputError

    entries: list[dict[str, object]] = []
    fx = DetkitFixture("t::x", entries.append)
    value = torch.arange(6, dtype=torch.float32)
    fx.record("a", value)
    value += 1  # the record is a copy, not a view of the caller's buffer
    assert torch.equal(fx.records["a"][0][1], torch.arange(6, dtype=torch.float32))
    with pytest.raises(InputError, match="already recorded"):
        fx.record("a", value)
    with pytest.raises(InputError, match="non-empty string"):
        fx.record("", value)
    with pytest.raises(InputError, match="nothing to record"):
        fx.record("b", None)
    fx._begin_rerun()
    fx.record("a", torch.arange(6, dtype=torch.float32))
    first, second = entries
    assert first["outputs"] == second["outputs"]  # same bits, same sha256
    assert first["outputs"][0]["dtype"] == "float32" and first["outputs"][0]["shape"] == [6]  # type: ignore[index]


def test_entries_survive_report_serialisation(pytester: pytest.Pytester) -> None:
    # pytest-xdist ships test reports from workers to the controller through
    # pytest_report_to_serializable / _from_serializable: the detkit entries ride along.
    pytester.makepyfile(
        test_user=HEADER
        + textwrap.dedent(
            """
            def test_check():
                assert_batch_invariant(torch.exp, X, batch_sizes=[2])
            """
        )
    )
    reprec = pytester.inline_run("-p", "no:cacheprovider")
    (call,) = [r for r in reprec.getreports("pytest_runtest_logreport") if r.when == "call"]
    config = pytester.parseconfigure()
    data = json.loads(json.dumps(config.hook.pytest_report_to_serializable(config=config, report=call)))
    back = config.hook.pytest_report_from_serializable(config=config, data=data)
    kinds = [e["type"] for e in back.detkit_entries]
    assert kinds == ["check", "test"] and back.detkit_entries[0]["verdict"] == "PASS"


LEAKY = """
    import detkit.mode

    def test_enables_and_fails_before_disabling():
        detkit.mode.enable()
        raise RuntimeError("failed before detkit.mode.disable()")

    def test_leaves_a_context_open():
        detkit.batch_invariant(portable=True).__enter__()

    @pytest.mark.batch_invariant
    def test_marked_and_enables():
        detkit.mode.enable(portable=True)

    def test_next_test_runs_without_the_mode():
        assert not detkit.mode.is_enabled()
    """


def _assert_mode_not_leaked(result: pytest.RunResult) -> None:
    try:
        result.assert_outcomes(passed=3, failed=1, warnings=2)
        result.stdout.fnmatch_lines(
            ["*test_enables_and_fails_before_disabling left detkit's mode on*restored*",
             "*test_leaves_a_context_open left detkit's mode on*restored*"]
        )
        assert not detkit.mode.is_enabled()
    finally:
        detkit.mode.disable()  # a leak must not reach the tests of this suite either


def test_a_test_body_that_leaves_the_mode_on_does_not_leak_into_the_next_test(pytester: pytest.Pytester) -> None:
    # An unmarked test that turns the mode on and fails before turning it off would
    # otherwise run every later test of its process under the mode: verdicts would
    # depend on test order and, under xdist, on which worker ran what.
    _assert_mode_not_leaked(_run(pytester, LEAKY, "-p", "no:randomly"))


def test_the_mode_does_not_leak_between_tests_of_an_xdist_worker(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    _assert_mode_not_leaked(_run(pytester, LEAKY, "-p", "no:randomly", "-n", "1"))


STOPPED_EARLY = """
    def test_fails():
        assert_batch_invariant(lambda t: t - t.mean(0), X, batch_sizes=[2])

    def test_never_runs():
        assert_batch_invariant(torch.exp, X, batch_sizes=[2])
    """


def test_a_run_stopped_by_maxfail_writes_a_partial_report(pytester: pytest.Pytester) -> None:
    # -x/--maxfail leaves tests unrun: a "complete" report would read as if they had no checks.
    result = _run(pytester, STOPPED_EARLY, "-p", "no:randomly", "-x", "--detkit-report=out.json")
    result.assert_outcomes(failed=1)
    report = load_report(pytester.path / "out.json")
    assert report["status"] == "partial" and report["summary"]["checks"] == 1


def test_a_run_stopped_by_maxfail_under_xdist_writes_a_partial_report(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    result = _run(pytester, STOPPED_EARLY, "-p", "no:randomly", "-x", "-n", "1", "--detkit-report=out.json")
    result.assert_outcomes(failed=1)
    assert load_report(pytester.path / "out.json")["status"] == "partial"


def test_a_relative_report_path_does_not_follow_a_test_that_changes_directory(pytester: pytest.Pytester) -> None:
    (pytester.path / "elsewhere").mkdir()
    result = _run(
        pytester,
        """
        def test_in_another_directory(monkeypatch):
            monkeypatch.chdir("elsewhere")
            assert_batch_invariant(torch.exp, X, batch_sizes=[2])
        """,
        "--detkit-report=out.json",
    )
    result.assert_outcomes(passed=1)
    assert not (pytester.path / "elsewhere" / "out.json").exists()
    assert load_report(pytester.path / "out.json")["summary"]["checks"] == 1
    result.stdout.fnmatch_lines(["detkit: 1 checks in 1 tests: *; report out.json"])


def _assert_a_timeout_not_nondeterminism(result: pytest.RunResult) -> None:
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*Failed: Timeout (>1.0s) from pytest-timeout."])
    result.stdout.no_fnmatch_line("*NONDETERMINISTIC*")


def test_a_timeout_during_a_deterministic_rerun_is_not_nondeterminism(pytester: pytest.Pytester) -> None:
    # pytest-timeout's limit covers all runs together; its signal method raises this
    # pytest.fail in the body, here in run 2 as if the runs had added up past the limit.
    result = _run(
        pytester,
        """
        RUNS = []

        @pytest.mark.deterministic(runs=3)
        def test_slow():
            RUNS.append(1)
            if len(RUNS) == 2:
                pytest.fail("Timeout (>1.0s) from pytest-timeout.")
            return torch.ones(2)
        """,
    )
    _assert_a_timeout_not_nondeterminism(result)


def test_pytest_timeout_during_a_deterministic_rerun_is_not_nondeterminism(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_timeout")
    result = _run(
        pytester,
        """
        import time

        @pytest.mark.deterministic(runs=3)
        def test_slow():
            time.sleep(0.4)
            return torch.ones(2)
        """,
        "--timeout=1", "--timeout-method=signal",
    )
    _assert_a_timeout_not_nondeterminism(result)


def test_pytest_exit_in_a_deterministic_rerun_stops_the_session(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        RUNS = []

        @pytest.mark.deterministic(runs=3)
        def test_exits():
            RUNS.append(1)
            if len(RUNS) == 2:
                pytest.exit("stop the session")
            return torch.ones(2)

        def test_never_runs():
            pass
        """,
        "-p", "no:randomly",
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*Exit: stop the session*"])
    result.stdout.no_fnmatch_line("*NONDETERMINISTIC*")
