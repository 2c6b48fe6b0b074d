"""Probe suites written as data (TOML).

A suite names the prompts to probe and how to vary the batches around them::

    name = "feynman"
    description = "..."
    max_new_tokens = 48
    seed = 0
    modes = ["single", "mixed", "prefix", "padding", "decode", "repeat"]

    [[prompts]]
    id = "feynman"
    text = "Tell me about Richard Feynman"

    [batch]
    sizes = [1, 2, 4, 8]          # single: replicate; HTTP: concurrency levels
    mixed_trials = 4              # mixed: random batches per prompt
    prefix_fractions = [0.25, 0.5, 0.75]
    padding = [1, 4, 16]          # padding: extra left pad tokens
    repeats = 3                   # repeat: how often the same batch is run
    fillers = ["...", "..."]      # texts the filler prompts are cut from

Unknown keys are errors (a typo must not silently change what is measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkit.errors import InputError

MODES = ("single", "mixed", "prefix", "padding", "decode", "repeat")

DEFAULT_FILLERS = (
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker "
    "who repaired every clock in the valley except his own.",
    "List the first ten prime numbers and explain why 1 is not prime.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "Translate to French: the weather is nice today and we are going to the beach.",
    "import numpy as np\nx = np.linspace(0, 1, 11)\nprint(x.sum())",
    "Q: What is the capital of Australia?\nA:",
)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError("every prompt needs a non-empty string id")
        if not self.text or not isinstance(self.text, str):
            raise ValueError(f"prompt {self.id!r} needs a non-empty text")


MAX_BATCH = 4096  # as detkit audit


@dataclass(frozen=True)
class BatchPlan:
    """How batches are varied around the probe prompts."""

    sizes: tuple[int, ...] = (1, 2, 4, 8)
    mixed_trials: int = 4
    prefix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    padding: tuple[int, ...] = (1, 4, 16)
    repeats: int = 3
    fillers: tuple[str, ...] = DEFAULT_FILLERS

    def __post_init__(self) -> None:
        # bool is an int to Python: `sizes = [true]` would run as 1 and be reported as true
        if not self.sizes or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.sizes):
            raise ValueError(f"batch sizes must be positive integers, got {list(self.sizes)}")
        if max(self.sizes) > MAX_BATCH:  # a typo such as 100000 would otherwise run for hours
            raise ValueError(f"batch sizes (and concurrency) must be at most {MAX_BATCH}, got {max(self.sizes)}")
        if self.mixed_trials < 1 or self.repeats < 1:
            raise ValueError("mixed_trials and repeats must be >= 1")
        # Empty lists would make their mode run nothing, and a mode with no runs would
        # still read "identical to the reference" in the verdict.
        if not self.prefix_fractions or not self.padding:
            raise ValueError("prefix_fractions and padding need at least one entry each "
                             "(leave a mode out with modes = [...] instead)")
        if any(not 0.0 < f < 1.0 for f in self.prefix_fractions):
            raise ValueError(f"prefix_fractions must lie strictly between 0 and 1, got {list(self.prefix_fractions)}")
        if any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in self.padding):
            raise ValueError(f"padding amounts must be positive integers, got {list(self.padding)}")
        if not self.fillers or any(not isinstance(f, str) or not f for f in self.fillers):
            raise ValueError("fillers must be a non-empty list of non-empty strings")

    @property
    def max_size(self) -> int:
        return max(self.sizes)


@dataclass(frozen=True)
class ProbeSuite:
    name: str
    prompts: tuple[Prompt, ...]
    description: str = ""
    max_new_tokens: int = 32
    seed: int = 0
    modes: tuple[str, ...] = MODES
    batch: BatchPlan = field(default_factory=BatchPlan)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"suite {self.name!r} has no prompts")
        ids = [p.id for p in self.prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"suite {self.name!r} has duplicate prompt ids: {ids}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown probe mode(s) {bad}; choose from {', '.join(MODES)}")
        # A mode listed twice would run twice and be counted twice in the summary.
        twice = sorted({m for m in self.modes if self.modes.count(m) > 1})
        if twice:
            raise ValueError(f"probe mode(s) listed more than once: {', '.join(twice)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "modes": list(self.modes),
            "prompts": [{"id": p.id, "text": p.text} for p in self.prompts],
            "batch": {
                "sizes": list(self.batch.sizes),
                "mixed_trials": self.batch.mixed_trials,
                "prefix_fractions": list(self.batch.prefix_fractions),
                "padding": list(self.batch.padding),
                "repeats": self.batch.repeats,
                "fillers": list(self.batch.fillers),
            },
        }


_TOP_KEYS = {"name", "description", "max_new_tokens", "seed", "modes", "prompts", "batch"}
_BATCH_KEYS = {"sizes", "mixed_trials", "prefix_fractions", "padding", "repeats", "fillers"}


def _list(table: dict[str, Any], key: str) -> tuple[Any, ...]:
    # tuple() of a string would silently make one entry per character (fillers, modes)
    value = table[key]
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list such as {key} = [...], got {value!r}")
    return tuple(value)


def _int(table: dict[str, Any], key: str) -> int:
    # int() would silently truncate 2.5 or read true as 1
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def suite_from_dict(data: dict[str, Any], *, source: str = "suite") -> ProbeSuite:
    """Build and validate a suite from parsed TOML; errors name the offending key."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InputError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    batch = data.get("batch", {})
    if not isinstance(batch, dict):
        raise InputError(f"{source}: [batch] must be a table")
    unknown = set(batch) - _BATCH_KEYS
    if unknown:
        raise InputError(f"{source}: unknown key(s) in [batch] {sorted(unknown)}; allowed: {sorted(_BATCH_KEYS)}")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise InputError(f"{source}: needs at least one [[prompts]] entry with id and text")
    try:
        plan_kwargs: dict[str, Any] = {}
        for key in ("sizes", "prefix_fractions", "padding", "fillers"):
            if key in batch:
                plan_kwargs[key] = _list(batch, key)
        for key in ("mixed_trials", "repeats"):
            if key in batch:
                plan_kwargs[key] = _int(batch, key)
        parsed = []
        for i, p in enumerate(prompts):
            if not isinstance(p, dict) or set(p) - {"id", "text"}:
                raise ValueError(f"prompt #{i + 1} must be a table with exactly the keys id and text")
            parsed.append(Prompt(id=str(p.get("id", "")), text=p.get("text", "")))
        kwargs: dict[str, Any] = {"name": str(data.get("name", source)), "prompts": tuple(parsed)}
        if "description" in data:
            kwargs["description"] = str(data["description"])
        for key in ("max_new_tokens", "seed"):
            if key in data:
                kwargs[key] = _int(data, key)
        if "modes" in data:
            kwargs["modes"] = _list(data, "modes")
        return ProbeSuite(batch=BatchPlan(**plan_kwargs), **kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: {exc}") from exc


def shipped_suites() -> dict[str, Path]:
    """The suites that ship with detkit, by name (``probes/*.toml``; in a wheel, ``detkit/probes``)."""
    folder = Path(__file__).resolve().parent.parent / "probes"
    return {f.stem: f for f in sorted(folder.glob("*.toml"))}


def load_suite(path: str | Path) -> ProbeSuite:
    """Read a probe suite from a TOML file, or a shipped one by name (``feynman``)."""
    try:
        import tomllib
    except ModuleNotFoundError as exc:  # Python 3.10
        raise InputError("probe suite files need Python >= 3.11 (tomllib); use the built-in default suite") from exc
    p = Path(path)
    if not p.is_file():
        shipped = shipped_suites()
        # A bare name (no folder, no suffix) picks a shipped suite, so that an installed
        # wheel, which has no probes/ folder next to the user's work, can run them.
        if p.parent == Path(".") and p.suffix == "" and p.name in shipped:
            p = shipped[p.name]
        else:
            names = ", ".join(shipped) or "none found"
            raise InputError(f"no probe suite at {p}; give a TOML file, or the name of a shipped suite ({names})")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p} is not valid TOML: {exc}") from exc
    return suite_from_dict(data, source=str(p))


def default_suite() -> ProbeSuite:
    """The suite used when no file is given (the same as probes/default.toml).

    Small enough to run in minutes on a laptop CPU under the mode: two prompts, every
    mode, batch sizes 1-8.
    """
    return ProbeSuite(
        name="default",
        description="Two short prompts, every mode, batch sizes 1-8: a quick first look.",
        prompts=(
            Prompt("feynman", "Tell me about Richard Feynman"),
            Prompt("fox", "The quick brown fox"),
        ),
        batch=BatchPlan(mixed_trials=3, prefix_fractions=(0.5,), padding=(1, 8), repeats=2),
    )
