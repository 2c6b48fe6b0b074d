"""benchmarks/bench_mode.py on a real (tiny, offline) Hugging Face model, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_mode.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("transformers")
    mod = load_script(BENCH, monkeypatch)
    return mod


def test_times_plain_and_mode_generate_per_batch_size(bench: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mode.json"
    rc = bench.main(["--batch-sizes", "1,3", "--new-tokens", "2", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["preset"] == "tiny-llama"
    assert [c["batch"] for c in data["cases"]] == [1, 3]
    for case in data["cases"]:
        assert case["plain_ms"] > 0 and case["mode_ms"] > 0 and case["fallbacks"] == {}
        assert case["ratio"] == pytest.approx(case["mode_ms"] / case["plain_ms"], rel=1e-2)
        assert case["mode_first_ms"] > 0  # the warm-up is left out of the medians but reported
    table = capsys.readouterr().out
    assert "| batch | new tokens | plain ms | mode ms |" in table and table.count("| none |") == 2
    assert "| mode first call ms | routed calls | extra us per routed call |" in table
    for case in data["cases"]:  # tiny-llama routes its norms, linears, SDPA and lm_head on every token
        assert case["routed_calls"] >= 2 * (4 * 9 + 2)
        assert case["extra_us_per_routed_call"] == pytest.approx(
            (case["mode_ms"] - case["plain_ms"]) * 1e3 / case["routed_calls"], rel=1e-6)


def test_a_profile_of_one_generate_under_the_mode(bench: Any, tmp_path: Path) -> None:
    """--profile writes cProfile's tables of one warm generate under the mode, headed by
    the routed calls it made."""
    prof = tmp_path / "mode.prof.txt"
    assert bench.main(["--batch-sizes", "2", "--new-tokens", "2", "--repeats", "1", "--profile", str(prof)]) == 0
    text = prof.read_text()
    assert text.startswith("# cProfile of one greedy generate under batch_invariant(portable=False): batch 2")
    assert "'linear'" in text or "'mm'" in text
    assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
    assert "_aten_adapters.py" in text


def test_bad_arguments_exit_2_with_the_reason(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--batch-sizes", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert bench.main(["--preset", "no-such-model"]) == 2
    assert "no model at 'no-such-model'" in capsys.readouterr().err


def test_a_local_model_directory_is_timed_too(bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state-space model saved with save_pretrained (tiny Mamba2, with the byte tokenizer):
    its chunked scan's cumsum is routed, nothing falls back."""
    import transformers

    from detkit.models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

    config = transformers.Mamba2Config(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                                       eos_token_id=EOS_ID, hidden_size=64, state_size=16, num_heads=8, head_dim=16,
                                       n_groups=1, num_hidden_layers=2, chunk_size=8)
    transformers.Mamba2ForCausalLM(config).save_pretrained(tmp_path / "mamba2")
    build_tokenizer().save_pretrained(tmp_path / "mamba2")
    out = tmp_path / "mode.json"
    rc = bench.main(["--preset", str(tmp_path / "mamba2"), "--attn", "eager", "--batch-sizes", "2", "--new-tokens", "2",
                     "--repeats", "1", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["meta"]["preset"] == str(tmp_path / "mamba2") and data["cases"][0]["fallbacks"] == {}
    assert "| none |" in capsys.readouterr().out


def test_relu_linear_is_one_kernel_call_under_the_mode(bench: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from detkit import _aten_adapters
    from detkit import kernels as real

    calls: list[tuple[int, ...]] = []

    def counting(a: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return real.matmul(a, *args, **kw)

    monkeypatch.setattr(_aten_adapters, "kernels_module", lambda: type("K", (), {"matmul": staticmethod(counting)}))
    out = tmp_path / "relu.json"
    assert bench.main(["--relu-linear", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    layer = data["layer"]
    # what the table's header says, as the generate JSON records it
    assert data["meta"]["threads"] == torch.get_num_threads() and data["meta"]["torch"] == torch.__version__
    assert layer["plain_ms"] > 0 and layer["mode_ms"] > 0 and "ReLU rows" in layer["name"]
    assert calls and set(calls) == {(128, 3072)}  # every call under the mode: the whole batch at once
    assert "| Linear(3072, 768) on 128 ReLU rows |" in capsys.readouterr().out


def _time_once_and_record_routing(bench: Any, monkeypatch: pytest.MonkeyPatch, mode_ms: float) -> list[dict[str, int]]:
    """Replace the timing loop: each layer call runs once plainly and once under the strict
    mode (its routed ops appended to the returned list) and times plain 1 ms, mode
    ``mode_ms``."""
    import detkit

    routed: list[dict[str, int]] = []

    def once(call: Any, repeats: int, portable: bool) -> tuple[float, float, dict[str, int], float]:
        call()
        with detkit.batch_invariant(portable=portable, strict=True) as bi:
            call()
        routed.append(bi.routed())
        return 1.0, mode_ms, {}, mode_ms + 1.0

    monkeypatch.setattr(bench, "_interleaved", once)
    return routed


def test_conv_times_the_routed_convolutions(bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    routed = _time_once_and_record_routing(bench, monkeypatch, mode_ms=2.0)
    out = tmp_path / "conv.json"
    assert bench.main(["--conv", "--repeats", "1", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert [x["name"].split(",")[0] for x in layers] == ["Mamba-2.8B conv1d"] * 2 + ["ViT-B/16 patch conv2d",
                                                                                     "EnCodec decoder conv_transpose1d"]
    assert all(x["ratio"] == 2.0 for x in layers)
    assert routed == [{"convolution": 1}] * 4
    assert "| Mamba-2.8B conv1d, decode 8 x 5120 x 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("portable", [False, True])
def test_reductions_times_the_composed_reductions(bench: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, portable: bool) -> None:
    routed = _time_once_and_record_routing(bench, monkeypatch, mode_ms=3.0)
    out = tmp_path / "reductions.json"
    argv = ["--reductions", "--dtype", "bfloat16", "--repeats", "1", "--json", str(out)] + ["--portable"] * portable
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["portable"] is portable and data["meta"]["dtype"] == "bfloat16"
    layers = data["layers"]
    assert [x["name"].split(" ")[0] for x in layers] == ["logsumexp"] * 2 + ["var", "vector_norm", "F.normalize"]
    assert all(x["ratio"] == 3.0 for x in layers)
    # each call is the composed op itself, not torch's kernel
    outer = ["logsumexp", "logsumexp", "var.correction", "linalg_vector_norm", "linalg_vector_norm"]
    assert [r[op] for r, op in zip(routed, outer, strict=True)] == [1] * 5
    assert "| logsumexp 8 x 151936 |" in capsys.readouterr().out


def test_vision_times_the_routed_pooling_and_interpolation(bench: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    routed = _time_once_and_record_routing(bench, monkeypatch, mode_ms=4.0)
    out = tmp_path / "vision.json"
    assert bench.main(["--vision", "--repeats", "1", "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["layers"]
    assert [x["name"].split(" ")[0] for x in layers] == ["Gemma", "GLM-4V", "HunYuan-VL", "GOT-OCR2", "image",
                                                         "DINOv2"]
    assert all(x["ratio"] == 4.0 for x in layers)
    ops = ["avg_pool2d", "grid_sampler_2d", "upsample_bilinear2d", "upsample_linear1d", "upsample_bilinear2d",
           "_upsample_bicubic2d_aa"]
    assert routed == [{op: 1} for op in ops]


def test_case_rejects_non_positive_times(bench: Any) -> None:
    with pytest.raises(ValueError, match="positive"):
        bench.Case(1, 2, 0.0, 1.0, {}, 1.0)
