"""Shared conventions for every JSON report detkit writes (audit, probe, pytest plugin).

A report is one JSON object:

``schema``        "detkit.report" ; ``schema_version``: int (see docs/report-schema.md)
``kind``          "audit" | "probe" | "pytest"
``status``        "running" | "partial" | "complete": a report whose run was interrupted
                  or crashed stays readable and says ``partial``
``created``/``updated``  ISO-8601 UTC timestamps
``detkit_version``
``fingerprint``   ``detkit.env.fingerprint().to_dict()``: every guarantee is conditional on it
``config``        what was asked for (ops, models, seeds, ...)
``results``       a list of records, appended as they finish
``errors``        a list of {where, error} for parts that raised and were skipped
``summary``       filled in at the end

The file is rewritten atomically (temp file + ``os.replace``) after every record, so
Ctrl-C or a crash never leaves a half-written file and never loses finished results.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from detkit.errors import ReportError

SCHEMA = "detkit.report"
SCHEMA_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fingerprint() -> dict[str, Any]:
    try:
        from detkit.env import fingerprint

        return fingerprint().to_dict()
    except Exception as exc:  # the fingerprint must never be the reason a report is lost
        return {"error": f"fingerprint unavailable: {exc}"}


def strict_json(data: Any) -> Any:
    """``data`` with every inf/nan float replaced by its repr ("inf", "-inf", "nan"):
    reports are strict JSON, and a non-finite value (a server's -inf logprob, a difference
    to it) must never be the reason a report is lost. Producers that know better convert
    first (``detkit.compare``)."""
    if isinstance(data, float):
        # float(): numpy's float64 is a float whose repr is "np.float64(nan)"
        return data if math.isfinite(data) else repr(float(data))
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def dumps(data: Any) -> str:
    """Strict, indented JSON of a report (what ``--json`` prints)."""
    return json.dumps(strict_json(data), indent=2, allow_nan=False, default=_json_default)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(data)  # before the temporary file: an unserialisable value leaves nothing behind
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.write("\n")
            # On disk before the rename: after a crash of the machine the report is the
            # old one or the new one, never an empty file under the new name.
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; a report is meant to be read by others (CI artifacts).
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        # What this hook returns is encoded as is: non-finite values inside it (a float32
        # inf, an array with a NaN) must go through strict_json too, or the write fails.
        if isinstance(obj, np.generic):
            return strict_json(obj.item())
        if isinstance(obj, np.ndarray):
            return strict_json(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "to_dict"):
        return strict_json(obj.to_dict())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


KINDS: tuple[str, ...] = ("audit", "probe", "pytest")
# Top-level fields every kind shares, with their types (docs/report-schema.md).
# (kind, the result's "record" field) -> the keys every such result has.
_RESULT_KEYS: dict[tuple[str, Any], tuple[str, ...]] = {
    ("pytest", None): ("test", "type"),
    ("audit", "op"): ("op", "dtype", "impl", "checks"),
}
_FIELD_TYPES: dict[str, type] = {"fingerprint": dict, "config": dict, "results": list, "errors": list, "summary": dict}


class ReportWriter:
    """Accumulates a report in memory and keeps ``path`` (if given) always valid on disk."""

    def __init__(self, kind: str, config: dict[str, Any], path: Path | str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown report kind {kind!r}; expected {', '.join(KINDS)}")
        from detkit import __version__

        self.path = Path(path) if path is not None else None
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "status": "running",
            "created": _now(),
            "updated": _now(),
            "detkit_version": __version__,
            "fingerprint": _fingerprint(),
            "config": config,
            "results": [],
            "errors": [],
            "summary": {},
        }
        self.flush()

    def add_result(self, record: dict[str, Any]) -> None:
        # Serialised before it joins the report: appended first, a value JSON cannot hold
        # made every later flush raise, and the records after it were lost.
        try:
            dumps(record)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"this result cannot be written to a JSON report ({exc}); record numbers, strings, "
                            "lists and dicts") from exc
        self.data["results"].append(record)
        self.flush()

    def add_error(self, where: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.data["errors"].append({"where": where, "error": text})
        self.flush()

    def finish(self, summary: dict[str, Any] | None = None, *, partial: bool = False) -> dict[str, Any]:
        if summary is not None:
            self.data["summary"] = summary
        self.data["status"] = "partial" if partial else "complete"
        self.flush()
        return self.data

    def flush(self) -> None:
        self.data["updated"] = _now()
        if self.path is not None:
            write_json_atomic(self.path, self.data)


def load_report(path: Path | str) -> dict[str, Any]:
    """Read a saved report, checking that it is one detkit can render."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"no report at {p}; run `detkit audit --out DIR`, `detkit probe --out DIR` or "
                          "`pytest --detkit-report=FILE` first")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read {p} ({exc.strerror})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # a binary file is not valid JSON either
        raise ReportError(f"{p} is not valid JSON ({exc}); was it written by detkit?") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ReportError(f"{p} is not a detkit report (missing schema {SCHEMA!r})")
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportError(f"{p} has schema_version {version!r}; detkit writes an integer. Is the file damaged?")
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"{p} has schema_version {data.get('schema_version')}, newer than this detkit "
            f"understands ({SCHEMA_VERSION}); upgrade detkit"
        )
    if data.get("kind") not in KINDS:
        raise ReportError(f"{p} has report kind {data.get('kind')!r}, which this detkit cannot render "
                          f"(it knows {', '.join(KINDS)})")
    # The renderers iterate these: a wrong type is a damaged file, not a crash in a renderer.
    for name, kind in _FIELD_TYPES.items():
        if name in data and not isinstance(data[name], kind):
            raise ReportError(f"{p}: field {name!r} is {type(data[name]).__name__}, not {kind.__name__}; "
                              "the file is damaged or was not written by detkit")
    for name in ("results", "errors"):
        if not all(isinstance(r, dict) for r in data.get(name, [])):
            raise ReportError(f"{p}: {name!r} holds something other than objects; the file is damaged or was "
                              "not written by detkit")
    # The fields the renderers read of each result (a hand-edited entry was a KeyError there).
    for i, r in enumerate(data.get("results", [])):
        need = _RESULT_KEYS.get((data["kind"], r.get("record")), ())
        missing = [k for k in need if k not in r]
        if missing or ("checks" in need and not isinstance(r["checks"], dict)):
            raise ReportError(f"{p}: results[{i}] lacks {', '.join(missing) or 'a checks object'}; the file is "
                              "damaged or was not written by detkit")
    return data
