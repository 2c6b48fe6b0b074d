"""How a user's test suite uses detkit: assertions, markers and the ``detkit`` fixture."""

from __future__ import annotations

import pytest
import torch
from tinynet import RMSNorm, TinyMLP, centre_by_batch_mean

from detkit.testing import (
    assert_batch_invariant,
    assert_bitwise_equal,
    assert_deterministic,
    assert_ulp_close,
)

X = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model() -> TinyMLP:
    return TinyMLP().eval()


def test_norm_is_batch_invariant() -> None:
    # Row-wise ops need no help: every row, batch sizes 1..64, random positions, bitwise.
    with torch.no_grad():
        assert_batch_invariant(RMSNorm(128), X, batch_sizes=[1, 2, 3, 8, 64])


def test_norm_is_close_to_a_float64_reference() -> None:
    norm = RMSNorm(128)
    with torch.no_grad():
        y = norm(X)
        y_ref = norm.double()(X.double()).float()
    assert_ulp_close(y, y_ref, max_ulp=4)


@pytest.mark.batch_invariant  # the body runs under detkit.batch_invariant()
def test_model_is_batch_invariant_under_detkit(model: TinyMLP) -> None:
    # Plain torch matmuls change with the batch size on most CPUs and GPUs; under the
    # mode every row's probabilities are the same bits whatever batch it sits in.
    with torch.no_grad():
        assert_batch_invariant(model, X, batch_sizes=[1, 2, 3, 8, 64])


def test_model_is_deterministic(model: TinyMLP) -> None:
    with torch.no_grad():
        assert_deterministic(model, X, runs=5)


@pytest.mark.deterministic(runs=3)  # the whole test runs 3 times; records must match bitwise
def test_forward_is_reproducible(detkit, model: TinyMLP) -> torch.Tensor:
    x = torch.randn(4, 128)  # the global RNG is restored before each run: same draws
    with torch.no_grad():
        detkit.record("probs", model(x))
        return model.norm(x)


def test_batch_statistics_bug_is_caught() -> None:
    # A negative control: detkit must flag a function that mixes rows of the batch.
    with pytest.raises(AssertionError, match="BATCH-VARIANT"):
        assert_batch_invariant(centre_by_batch_mean, X, batch_sizes=[1, 2, 4])


@pytest.mark.portable  # same bits on every device: compare with a stored digest or another machine
def test_portable_mode_matches_itself_across_batch_sizes(detkit, model: TinyMLP) -> None:
    with torch.no_grad():
        alone = torch.cat([model(X[i : i + 1]) for i in range(4)])
        together = model(X[:4])
    assert_bitwise_equal(together, alone)
    detkit.record("probs", together)  # its sha256 goes into --detkit-report


@pytest.mark.batch_invariant
def test_generation(detkit) -> None:
    # A tiny Hugging Face Llama built offline: each prompt generated alone and inside
    # left-padded batches of 1, 4 and 8 must give the same tokens and logits, bitwise.
    pytest.importorskip("transformers", reason="needs Hugging Face transformers: pip install 'detkit[hf]'")
    from detkit.models import build_tokenizer, load_preset

    llm = load_preset("tiny-llama")
    prompts = ["Hello", "The capital of France is", "1 2 3", "Determinism"]
    detkit.check_generation(llm, prompts, batch_sizes=[1, 4, 8], max_new_tokens=4, tokenizer=build_tokenizer())
