"""RL with a Hugging Face model: do the sampler and the trainer see the same policy?

One RL step, as RL libraries run it: the sampler, a frozen copy of the policy's weights
(as an inference engine holds them), draws completions with ``model.generate``
(temperature 1, a left-padded batch, KV cache, no autograd); the trainer scores the same
sequences with a teacher-forced forward (right-padded batches of another size, train
mode, autograd on) and takes a policy-gradient step. Where the two log-probabilities of a
sampled token differ, "on-policy" training is off-policy by that much. Printed, with and
without ``detkit.batch_invariant()``: how many sampled tokens got a different
log-probability from the trainer, the largest gap, and the sampler-trainer KL (exact,
over the whole vocabulary, float64).

    python examples/rl_sampler_trainer.py [--model tiny-llama] [--dtype bfloat16] [--attn sdpa]

Uses detkit's offline presets (seeded random weights, byte tokenizer): no download.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from rich.console import Console
from rich.table import Table

import detkit
from detkit.models import PRESETS, build_tokenizer, load_preset

PROMPTS = ["Tell me about Richard Feynman", "2+2=", "The quick brown fox", "Write a haiku about rain",
           "hi", "Once upon a time, in a land far away,"]


def sample(model: torch.nn.Module, tokenizer: object, new_tokens: int, seed: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Prompt ids, the sampler's logits (B, T, V) and the sampled tokens (B, T)."""
    tokenizer.padding_side = "left"  # type: ignore[attr-defined]
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")  # type: ignore[operator]
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            **enc, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            output_logits=True, return_dict_in_generate=True,
        )
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(enc.input_ids, enc.attention_mask)]
    return prompts, torch.stack(out.logits, 1), out.sequences[:, enc.input_ids.shape[1] :]


def train_step(model: torch.nn.Module, prompts: list[list[int]], tokens: torch.Tensor, batch: int,
               pad_id: int) -> torch.Tensor:
    """The trainer: logits (B, T, V) that predicted each sampled token, then one optimiser step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seqs = [p + t.tolist() for p, t in zip(prompts, tokens)]
    n_new = tokens.shape[1]
    picked = []
    for start in range(0, len(seqs), batch):
        group = seqs[start : start + batch]
        width = max(map(len, group))
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in group])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in group])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        for row, prompt in enumerate(prompts[start : start + batch]):
            picked.append(logits[row, len(prompt) - 1 : len(prompt) - 1 + n_new])
    trainer = torch.stack(picked)
    logp = trainer.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    loss = -logp.mean()  # REINFORCE with reward 1: the shape of a policy-gradient step
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    return trainer.detach()


def compare(sampler: torch.Tensor, trainer: torch.Tensor, tokens: torch.Tensor) -> tuple[str, str, str, str]:
    ls, lt = sampler.double().log_softmax(-1), trainer.double().log_softmax(-1)
    gap = (ls - lt).gather(-1, tokens[..., None]).squeeze(-1).abs()
    kl = (ls.exp() * (ls - lt)).sum(-1).clamp(min=0)
    differ = int((gap != 0).sum())
    same_bits = torch.equal(sampler, trainer)
    colour = "green" if same_bits else "red"
    return (f"[{colour}]{differ} of {gap.numel()}[/]", f"{float(gap.max()):.3g}", f"{float(kl.mean()):.3g}",
            f"[{colour}]{'yes' if same_bits else 'no'}[/]")


def count(text: str) -> int:
    """argparse type for --new-tokens and batch sizes: a usage error, not a traceback, below 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=PRESETS, default="tiny-llama")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa")
    parser.add_argument("--new-tokens", type=count, default=24)
    parser.add_argument("--trainer-batch", type=count, default=4, help="sequences per trainer forward (the sampler runs all at once)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = load_preset(args.model, dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    for module in base.modules():  # RL trainers run without dropout (GPT-2's config has 0.1)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokenizer = build_tokenizer()
    table = Table(title=f"{args.model} {args.dtype} {args.attn}: {len(PROMPTS)} prompts x {args.new_tokens} sampled tokens; "
                        f"sampler batch {len(PROMPTS)}, trainer batches of {args.trainer_batch}")
    for col in ("kernels", "tokens whose log-prob differs", "max |d log p|", "mean KL (nats)", "logits bitwise equal"):
        table.add_column(col)
    for label, ctx in (("torch", contextlib.nullcontext()), ("detkit.batch_invariant()", detkit.batch_invariant())):
        model = copy.deepcopy(base)  # both runs start from the same weights
        engine = copy.deepcopy(model).requires_grad_(False)  # the weights synced to the sampler
        with ctx:
            prompts, sampler, tokens = sample(engine, tokenizer, args.new_tokens, args.seed)
            trainer = train_step(model, prompts, tokens, args.trainer_batch, tokenizer.pad_token_id)
        table.add_row(label, *compare(sampler, trainer, tokens))
    console = Console(width=140)
    console.print(table)
    console.print("In CI: detkit.testing.assert_trainer_matches_sampler(model, prompts, tokenizer=tokenizer) "
                  "(docs/pytest.md).")


if __name__ == "__main__":
    main()
