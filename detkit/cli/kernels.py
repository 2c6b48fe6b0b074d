"""`detkit kernels check`: compile every CUDA kernel and report (no GPU needed)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

kernels_app = typer.Typer(
    name="kernels",
    help="detkit's kernels: compile-check the CUDA sources.",
    no_args_is_help=True,
    add_completion=False,
)


def _local_gpu() -> tuple[int, str] | None:
    """(device index, sm_XY) of the current GPU when torch and CuPy can use one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import cupy  # type: ignore[import-not-found]  # noqa: F401 - needed to load modules
    except ImportError:
        return None
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return index, f"sm_{major}{minor}"


def _check_on_gpu(index: int, arch: str) -> list[dict[str, Any]]:
    """Compile each file to CUBIN for the local GPU and load it there."""
    from detkit.kernels import cuda_loader

    return [r.as_dict() for r in cuda_loader.check_device(index, arch)]


def _print(rows: list[dict[str, Any]], target: str, resources: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Never squeeze the table below its natural width (a pipe gets 80 columns by default).
    console = Console(width=max(Console().width, 120))
    compilers = sorted({r["compiler"] for r in rows})
    from detkit.kernels import cuda_loader

    caption = ("compiler: " + "; ".join(compilers) + f"\ncompile cache: {cuda_loader.cache_dir()} (an output is "
               "reused only for the same source, options, architecture and compiler; set "
               f"{cuda_loader.ENV_CACHE_DIR} to an empty directory to compile everything again; least recently used "
               f"outputs are deleted past {cuda_loader.cache_limit_bytes() / (1 << 20):g} MB, "
               f"${cuda_loader.ENV_CACHE_MAX_MB})")
    table = Table(title=f"detkit CUDA kernels: compile check ({target})", title_justify="left",
                  # Text, not a markup string: compiler names look like "nvrtc [/path/libnvrtc.so]".
                  caption=Text(caption), caption_justify="left")
    for col in ("file", "arch", "status", "entries", "max regs", "spilling", "notes", "seconds"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        status = Text("ok", style="green") if r["ok"] else Text("FAILED", style="bold red")
        res = r["resources"]
        spilling = sum(_spills(x) for x in res)
        table.add_row(r["file"], r["arch"], status, str(len(r["entries"])),
                      str(max((x["registers"] for x in res), default="-")),
                      Text(str(spilling), style="yellow" if spilling else ""), str(len(r["notes"]) or ""),
                      f"{r['seconds']:.2f}")
    console.print(table)
    if resources:
        _print_resources(console, rows)
    for r in rows:
        for note in r["notes"]:
            console.print(Text(f"{r['file']} ({r['arch']}): {note}", style="yellow"))
    for r in rows:
        if not r["ok"]:
            err = Console(stderr=True)
            err.print(f"[bold red]{r['file']} ({r['arch']}) failed:[/]")
            err.print(Text("\n".join(r["log"].splitlines()[:40])))


def _spills(x: dict[str, Any]) -> bool:
    from detkit.kernels.cuda_resources import KernelResources

    return KernelResources(**x).spills


def _print_resources(console: Any, rows: list[dict[str, Any]]) -> None:
    """One row per entry point: what ptxas reports it uses."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="per entry point, as ptxas -v reports it", title_justify="left",
                  caption="regs, stack and spill bytes per thread; static shared memory per CTA (the matmul "
                  "launchers add their dynamic shared memory)", caption_justify="left")
    for col in ("entry point", "regs", "stack", "spill st", "spill ld", "smem"):
        table.add_column(col, no_wrap=True, justify="left" if col == "entry point" else "right")
    for r in rows:
        table.add_row(Text(f"{r['file']} ({r['arch']})", style="bold"), end_section=True)
        for x in r["resources"]:
            style = "yellow" if _spills(x) else ""
            table.add_row(Text(x["entry"], style=style), str(x["registers"]), str(x["stack_bytes"]),
                          Text(str(x["spill_store_bytes"]), style=style), Text(str(x["spill_load_bytes"]), style=style),
                          str(x["shared_bytes"]))
        table.add_section()
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``detkit kernels ...`` to the detkit app."""

    @kernels_app.command("check")
    def check(
        arch: Annotated[
            list[str] | None,
            typer.Option("--arch", help="Target architecture, e.g. sm_90 (repeatable). "
                         "Default: the local GPU, or sm_80 and sm_90 without one."),
        ] = None,
        compiler: Annotated[
            str | None,
            typer.Option("--compiler", help="nvrtc or nvcc (default: NVRTC if found, else nvcc)."),
        ] = None,
        resources: Annotated[
            bool,
            typer.Option("--resources", help="Also list every entry point's registers, stack frame, spills and "
                         "static shared memory, as ptxas reports them (always in --json)."),
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON only.")] = False,
    ) -> None:
        """Compile every CUDA kernel (cuda_kernels/*.cu) to CUBIN and report, with what ptxas says each kernel
        uses (registers, spills); exit 1 if any fails to compile."""
        from detkit.kernels import cuda_loader

        gpu = None if (arch or compiler) else _local_gpu()
        if gpu is not None:
            index, gpu_arch = gpu
            rows = _check_on_gpu(index, gpu_arch)
            target = f"local GPU cuda:{index}, {gpu_arch}"
        else:
            archs = tuple(arch) if arch else cuda_loader.DEFAULT_CHECK_ARCHS
            rows = [r.as_dict() for r in cuda_loader.check_all(archs, compiler=compiler)]
            target = "no GPU used: " + ", ".join(archs)
        ok = all(r["ok"] for r in rows)
        if as_json:
            payload = {"ok": ok, "target": target, "options": list(cuda_loader.COMPILE_OPTIONS),
                       "kernel_dir": str(cuda_loader.kernel_dir()), "compile_cache": str(cuda_loader.cache_dir()),
                       "compile_cache_limit_mb": cuda_loader.cache_limit_bytes() / (1 << 20),
                       "results": rows}
            typer.echo(json.dumps(payload, indent=2))
        else:
            _print(rows, target, resources)
        if not ok:
            raise typer.Exit(code=1)

    app.add_typer(kernels_app, name="kernels")
