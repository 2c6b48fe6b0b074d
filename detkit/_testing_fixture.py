"""The object behind the ``detkit`` pytest fixture."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from detkit import _testing_values as V
from detkit import testing as T
from detkit.errors import InputError


class DetkitFixture:
    """detkit.testing's assertions, plus ``record``, ``check_generation`` and ``check_sampler_trainer``.

    Every check made through it (or through ``detkit.testing`` directly) is recorded by
    the plugin: terminal summary and ``--detkit-report``. ``record(name, value)`` keeps a
    copy of a result: under ``@pytest.mark.deterministic`` the records of every rerun are
    compared bitwise, and the report stores their sha256 so that runs on two machines can
    be compared.
    """

    def __init__(self, nodeid: str, sink: Callable[[dict[str, Any]], None]) -> None:
        self.nodeid = nodeid
        self._sink = sink
        self._records: list[dict[str, V.Leaves]] = [{}]

    # The assertions: same signatures as detkit.testing.
    def assert_batch_invariant(self, fn: Callable[..., Any], x: Any, batch_sizes: Sequence[int] = T.DEFAULT_BATCH_SIZES, **kwargs: Any) -> T.CheckResult:
        __tracebackhide__ = True
        return T.assert_batch_invariant(fn, x, batch_sizes, **kwargs)

    def assert_deterministic(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> T.CheckResult:
        __tracebackhide__ = True
        return T.assert_deterministic(fn, *args, **kwargs)

    def assert_bitwise_equal(self, actual: Any, expected: Any, **kwargs: Any) -> T.CheckResult:
        __tracebackhide__ = True
        return T.assert_bitwise_equal(actual, expected, **kwargs)

    def assert_ulp_close(self, actual: Any, expected: Any, max_ulp: int = 2, **kwargs: Any) -> T.CheckResult:
        __tracebackhide__ = True
        return T.assert_ulp_close(actual, expected, max_ulp, **kwargs)

    def check_generation(
        self,
        model: Any,
        prompts_or_input_ids: Any,
        batch_sizes: Sequence[int] = (1, 4, 8),
        *,
        max_new_tokens: int = 8,
        tokenizer: Any = None,
        seed: int = 0,
        name: str | None = None,
        padding_side: str | None = None,
    ) -> T.CheckResult:
        """Greedy generation alone vs in padded batches: see ``assert_generation_invariant``."""
        __tracebackhide__ = True
        return T.assert_generation_invariant(
            model, prompts_or_input_ids, batch_sizes, max_new_tokens=max_new_tokens, tokenizer=tokenizer, seed=seed,
            name=name, padding_side=padding_side,
        )

    def check_sampler_trainer(self, model: Any, prompts_or_input_ids: Any, **kwargs: Any) -> T.CheckResult:
        """The trainer's forward vs the sampler's logits: see ``assert_trainer_matches_sampler``."""
        __tracebackhide__ = True
        return T.assert_trainer_matches_sampler(model, prompts_or_input_ids, **kwargs)

    def batch_invariant(self, portable: bool = False) -> AbstractContextManager[Any]:
        """``detkit.batch_invariant(portable=...)``, for a block inside a test."""
        from detkit.mode import batch_invariant

        return batch_invariant(portable=portable)

    def record(self, name: str, value: Any) -> None:
        """Keep a copy of ``value`` (a tensor/array or a structure of them) under ``name``."""
        if not isinstance(name, str) or not name:
            raise InputError(f"record name must be a non-empty string, got {name!r}")
        current = self._records[-1]
        if name in current:
            raise InputError(f"{name!r} was already recorded in this run of the test; use a different name")
        leaves = [(p, V.snapshot(leaf)) for p, leaf in V.flatten(value, f"record {name!r}")]
        if not leaves:
            raise InputError(f"record {name!r}: nothing to record (None or an empty structure)")
        current[name] = leaves
        self._sink(
            {
                "type": "record",
                "name": name,
                "outputs": [
                    {"output": p, "dtype": V.dtype_name(leaf), "shape": list(V.shape_of(leaf)), "sha256": V.digest(leaf)}
                    for p, leaf in leaves
                ],
            }
        )

    @property
    def records(self) -> dict[str, V.Leaves]:
        """The records of the current run, by name: [(output path, copy), ...]."""
        return self._records[-1]

    def _begin_rerun(self) -> None:
        self._records.append({})
