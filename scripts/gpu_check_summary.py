"""summary.json and summary.md of a scripts/gpu-check run, from the files its steps wrote.

    python scripts/gpu_check_summary.py OUT_DIR TESTS_EXIT_CODE SECONDS COMPILE_LIMIT_S

Exit status 0 if GPU tests ran and all passed, 1 otherwise (gpu-check's own).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _tail(path: Path, chars: int = 2000) -> str:
    """The end of a log a step wrote, or "" where the step never ran."""
    return path.read_text()[-chars:] if path.exists() else ""


def summarize(out: Path, test_rc: int, seconds: int, compile_limit: str) -> int:
    """Write ``out``/summary.json and summary.md; print the Markdown; the exit status."""
    summary: dict[str, Any] = {"seconds": seconds, "tests_exit_code": test_rc,
                               "device": (out / "nvidia-smi.txt").read_text().strip().splitlines()[-1:]}
    try:
        summary["versions"] = json.loads((out / "versions.json").read_text())
    except Exception as err:  # noqa: BLE001 - torch itself may not import
        summary["versions"] = {"error": repr(err), "stderr": _tail(out / "versions.err")}
    try:
        kc = json.loads((out / "kernels_check.json").read_text())
        summary["kernels_check"] = {"ok": kc["ok"], "target": kc["target"],
                                    "files": {r["file"]: r["ok"] for r in kc["results"]},
                                    # the GPU machine's compiler may allocate registers differently
                                    "spilling": {x["entry"]: x["spill_store_bytes"] for r in kc["results"]
                                                 for x in r.get("resources", []) if x["spill_store_bytes"]},
                                    "ptxas_notes": [n for r in kc["results"] for n in r.get("notes", [])]}
    except Exception as err:  # noqa: BLE001 - report whatever went wrong
        summary["kernels_check"] = {"error": repr(err), "stderr": _tail(out / "kernels_check.err")}
    # Its exit status: 124 (or 137) is the time limit, which leaves no JSON and no stderr to read.
    kc_rc = (out / "kernels_check.rc").read_text().split() if (out / "kernels_check.rc").exists() else []
    summary["kernels_check"]["exit"] = int(kc_rc[-1]) if kc_rc and kc_rc[-1].isdigit() else None
    if summary["kernels_check"]["exit"] in (124, 137):
        summary["kernels_check"]["timed_out"] = (f"stopped at its time limit ({compile_limit} s, "
                                                 "$DETKIT_GPU_CHECK_COMPILE_S)")
    tests = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "groups": {}, "measured": []}
    for xml in sorted(out.glob("gpu_tests_*.xml")):
        group = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "tests": []}
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                group["tests"].append(name)
                # what a test measured and recorded (record_property) without asserting it
                tests["measured"] += [{"test": case.get("name"), "name": p.get("name"), "value": p.get("value")}
                                      for p in case.iter("property")]
                if case.find("failure") is not None or case.find("error") is not None:
                    node = case.find("failure") if case.find("failure") is not None else case.find("error")
                    kind = "failed" if case.find("failure") is not None else "errors"
                    group[kind] += 1
                    tests["failures"].append({"test": name, "message": (node.get("message") or "")[:500]})
                elif case.find("skipped") is not None:
                    group["skipped"] += 1
                else:
                    group["passed"] += 1
        except Exception as err:  # noqa: BLE001 - a group killed before it wrote its XML
            group["error"] = repr(err)
        for key in ("passed", "failed", "errors", "skipped"):
            tests[key] += group[key]
        tests["groups"][xml.stem.removeprefix("gpu_tests_")] = group
    summary["tests"] = tests
    try:
        bench = json.loads((out / "bench_cuda.json").read_text())
        summary["bench"] = {"meta": bench["meta"], "targets_met": sum(t["met"] for t in bench["targets"]),
                            "targets": len(bench["targets"]), "tile_choice": bench.get("tile_choice")}
    except Exception as err:  # noqa: BLE001
        summary["bench"] = {"error": repr(err)}
    audit = out / "gpu-audit" / "report.json"
    summary["audit"] = {"report": str(audit) if audit.exists() else None,
                        "log_tail": _tail(out / "audit.log", 1500) or None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = ["# detkit gpu-check", "", f"Device: {', '.join(summary['device'])}; {seconds} s.", "",
          f"Versions: {summary['versions']}", "",
          f"Kernels check: {summary['kernels_check']}", "",
          f"GPU tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
          f"{tests['skipped']} skipped.", ""]
    md += [f"- group {name}: {g['passed']} passed, {g['failed']} failed, {g['errors']} errors, {g['skipped']} skipped"
           + (f" ({g['error']})" if g.get("error") else "") for name, g in tests["groups"].items()]
    md += [""]
    md += [f"- FAILED {f['test']}: {f['message']}" for f in tests["failures"]]
    if tests["measured"]:
        md += ["", "Measured by the tests (recorded, not asserted; mostly torch's own kernels on this GPU):", ""]
        md += [f"- {m['name']}: {m['value']}" for m in tests["measured"]]
    for part in ("bench_cuda.md", "bench_mode.md", "bench_host.md", "profile_cuda.md"):
        if (out / part).exists():
            md += ["", (out / part).read_text()]
    # Passing means GPU tests ran: all of them skipped (no GPU, no CuPy) is a failure here.
    ok = (test_rc == 0 and tests["passed"] > 0 and tests["failed"] == 0 and tests["errors"] == 0
          and len(tests["groups"]) == 5 and not any(g.get("error") for g in tests["groups"].values()))
    if tests["passed"] == 0:
        md.insert(2, "**No GPU test ran** (all skipped or none collected): see gpu_tests.log for the skip reason.")
    md.insert(2, f"Verdict: {'PASS' if ok else 'FAIL'}")
    summary["ok"] = ok
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    return summarize(Path(argv[0]), int(argv[1]), int(argv[2]), argv[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
