"""benchmarks/bench_host.py: what it times and what it leaves behind (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script

from detkit.kernels import _backend
from detkit.kernels import cuda as cuda_backend

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_host.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return load_script(BENCH, monkeypatch)


def test_every_case_goes_through_the_cuda_launchers_packing_and_the_mode(bench: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each case's detkit call reaches cuLaunchKernel's place with packed arguments (not the
    CPU kernels), the mode routes each torch call (the run checks it), and the rows land
    in the JSON."""
    launched: list[str] = []
    packed = cuda_backend._kernel_params

    def kernel_params(sig: str, args: tuple[Any, ...]) -> tuple[int, tuple[int, ...]]:
        launched.append(sig)
        return packed(sig, args)

    monkeypatch.setattr(cuda_backend, "_kernel_params", kernel_params)
    out = tmp_path / "host.json"
    assert bench.main(["--repeats", "1", "--calls", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["op"] for r in rows] == ["softmax", "softmax", "rms_norm", "layer_norm", "linear", "linear",
                                       "sdpa decode", "sdpa decode"]
    assert all(r["torch_us"] > 0 and r["kernels_us"] > 0 and r["mode_us"] > 0 for r in rows)
    # softmax, rms_norm, layer_norm, float32 matmul, the CUDA-core split attention kernel
    # and its combine, the tensor-core one (16 keys: one split, no combine)
    assert set(launched) == {"PPii", "PPPif", "PPPPif", "PPPPiiiqqqq", "PPPPqqqqPPPPqiiiiiiiif", "PPPPPqiiiii",
                             "PPPPqqqqPPPPPiiiiiiifi"}


def test_the_routing_is_undone(bench: Any) -> None:
    """After a run (or a failure inside one) CPU tensors take the CPU kernels again and the
    launcher has its own functions back."""
    before = dict(vars(cuda_backend)), dict(_backend.BACKEND_MODULES)
    with pytest.raises(RuntimeError, match="boom"), bench.cuda_launch_path_without_a_gpu():
        assert _backend.BACKEND_MODULES[("cpu", False)] == "detkit.kernels.cuda"
        raise RuntimeError("boom")
    assert dict(vars(cuda_backend)) == before[0] and dict(_backend.BACKEND_MODULES) == before[1]
    threads = torch.get_num_threads()
    bench.run(1, 1)
    assert torch.get_num_threads() == threads


def test_bad_counts_exit_2(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--calls", "0"])
    assert exc.value.code == 2 and "--calls" in capsys.readouterr().err


def test_real_launches_without_a_gpu_exit_2_and_say_why(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    if cuda_backend.available()[0]:
        pytest.skip("this machine has a GPU: --device cuda would run")
    assert bench.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs detkit's CUDA backend" in err and cuda_backend.available()[1] in err
