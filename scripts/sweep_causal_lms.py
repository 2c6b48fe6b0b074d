"""Run every causal-LM architecture transformers knows under the torch mode.

Each ``model_type`` with a causal-LM class is built from ``AutoConfig.for_model`` shrunk to
2 layers, hidden 64, 4 heads (2 KV heads), head dim 16, a 512-token vocabulary and at most
4 experts, with random weights; architectures still above 20M parameters are skipped.
A forward of a left-padded batch of 2 and a 2-token greedy ``generate`` run first without
the mode (an architecture that fails there is skipped: not the mode's doing), then under
``batch_invariant()`` and ``batch_invariant(portable=True)``. An architecture passes when
nothing raised, nothing fell back (``uncovered()``), nothing routed came from torch's math
library in portable mode (``not_portable()``) and the logits are within ``--rtol`` of
torch's (relative to the largest logit). This checks that the mode runs the architecture,
not invariance: the family tests do that. Usage::

    python scripts/sweep_causal_lms.py [--only llama,gpt2] [--json sweep.json]

Exit 0 when every architecture that runs without the mode passes under it, 1 otherwise.
Results are written after each architecture, so an interruption keeps the finished ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SHRINK = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=512, head_dim=16)
FEWER_EXPERTS = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=32,
                     num_experts_per_tok=2, max_position_embeddings=256)
MAX_PARAMETERS = 20_000_000


@dataclass
class Outcome:
    model_type: str
    status: str  # "passed", "failed", "skipped"
    reason: str = ""
    max_rel_diff: dict[str, float] = field(default_factory=dict)


def _build(model_type: str) -> Any:
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    for key, value in SHRINK.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key, value in FEWER_EXPERTS.items():
        if getattr(config, key, None) is not None:
            setattr(config, key, value)
    with torch.device("meta"):
        size = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters with these sizes")
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def sweep_one(model_type: str, rtol: float) -> Outcome:
    import detkit

    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding

    def run() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        return logits

    try:
        model = _build(model_type)
        with torch.no_grad():
            reference = run()
    except Exception as err:  # noqa: BLE001 - any failure without the mode is the architecture's
        return Outcome(model_type, "skipped", f"does not run without the mode: {type(err).__name__}: {err}"[:300])
    outcome = Outcome(model_type, "passed")
    scale = float(reference.abs().max()) or 1.0
    for portable in (False, True):
        label = "portable" if portable else "batch_invariant"
        try:
            with torch.no_grad(), detkit.batch_invariant(portable=portable) as bi:
                logits = run()
        except Exception as err:  # noqa: BLE001 - reported, the sweep goes on
            return Outcome(model_type, "failed", f"{label}: raised {type(err).__name__}: {err}"[:300])
        outcome.max_rel_diff[label] = float((logits.double() - reference.double()).abs().max()) / scale
        problems = {"fell back": bi.uncovered(), "not portable": bi.not_portable() if portable else {}}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            return Outcome(model_type, "failed", f"{label}: {problems}"[:300], outcome.max_rel_diff)
        if not outcome.max_rel_diff[label] <= rtol:
            return Outcome(model_type, "failed", f"{label}: logits differ by {outcome.max_rel_diff[label]:.1e}",
                           outcome.max_rel_diff)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: every causal LM)")
    parser.add_argument("--json", type=Path, help="write the outcomes here (after each architecture)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="logit difference allowed, relative to the largest")
    args = parser.parse_args(argv)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"error: not causal-LM model types here: {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    outcomes: list[Outcome] = []
    warnings.simplefilter("ignore")  # transformers' config and generation warnings, per model
    try:
        for i, name in enumerate(names, 1):
            outcome = sweep_one(name, args.rtol)
            outcomes.append(outcome)
            print(f"[{i}/{len(names)}] {name}: {outcome.status}{': ' + outcome.reason if outcome.reason else ''}",
                  flush=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    except KeyboardInterrupt:
        print(f"interrupted after {len(outcomes)} of {len(names)}", file=sys.stderr)
        return 130
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "skipped")}
    print(f"passed {counts['passed']}, failed {counts['failed']}, skipped {counts['skipped']} (do not run without "
          "the mode)")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
