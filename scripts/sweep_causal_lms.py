"""Run every causal-LM architecture transformers knows under the torch mode.

Each ``model_type`` with a causal-LM class is built from its config class with generic
small sizes (``SIZES``: 2 layers, hidden 64, 4 heads, 2 KV heads, head dim 16, a 512-token
vocabulary, at most 4 experts, small latent-attention, linear-attention and state-space
dims), one layer of each kind its layer pattern has (a hybrid keeps its attention layer),
token ids inside the vocabulary, the same sizes for a composite model's sub-configs (a
multimodal model's text and vision or audio towers; the inputs are text only), and
random weights; architectures still above 50M parameters are skipped. A forward of a
left-padded batch of 2 and a 2-token greedy ``generate`` run first without the mode (an
architecture that fails there is skipped: not the mode's doing), traced (``trace_ops``,
sorted by ``coverage_report``), then under ``batch_invariant()`` and
``batch_invariant(portable=True)``. An architecture *fails*
when something raised, fell back (``uncovered()``), came from torch's math library in
portable mode (``not_portable()``) or the logits are further than ``--rtol`` from torch's
(relative to the largest logit); it is *uncovered* when it ran but its trace holds ops
the mode leaves to torch (listed, with the architectures, at the end); else it passes.
This checks that the mode runs the architecture and covers its ops, not invariance: the
family tests do that. The tables the model computed when it was built
(``check_computed_buffers``) that differ from the portable values, or that it cannot
recompute, are listed too (not fixed, and not a failure). ``--task seq2seq`` sweeps the
encoder-decoder models (``AutoModelForSeq2SeqLM``: T5, BART, Marian, ...) instead, their
encoder inputs right padded and a forward given 3 decoder tokens; ``--task vision`` the
vision towers of image-text-to-text models (``AutoModelForImageTextToText``), each
model's ``get_image_features`` of two generic images (``image_inputs``; a model that
wants other inputs is skipped, as not running without the mode). Usage::

    python scripts/sweep_causal_lms.py [--only llama,gpt2] [--dtype bfloat16] [--task seq2seq|vision] [--json FILE]

Exit 0 when no architecture that runs without the mode fails under it, 1 otherwise.
Results are written after each architecture, so an interruption keeps the finished ones.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Generic small sizes, passed to the config's constructor (so that what it derives from
# them, such as a hybrid's layer pattern, an MLA head size or a Falcon head_dim, follows),
# each only where the architecture's config has that field.
SIZES = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=512, head_dim=16, max_position_embeddings=256,
    # older names (GPT-2, CodeGen, GPT-J, OPT, Bloom, ...)
    n_layer=2, n_head=4, n_embd=64, n_inner=128, ffn_dim=128, num_layers=2,
    rotary_dim=8, embedding_dim=64,
    # mixtures of experts: up to 4 experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2,
    num_experts_per_token=2, shared_expert_intermediate_size=32, shared_intermediate_size=32, n_group=1,
    topk_group=1, num_expert_group=1,
    # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, Kimi, LongCat) and its sparse indexer
    kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    index_n_heads=2, index_head_dim=16, index_topk=4,
    # linear attention and state-space layers (Qwen3-Next, Kimi-Linear, Mamba-2, Bamba, Zamba2, xLSTM)
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=16, linear_num_heads=4, mamba_n_heads=8, mamba_d_head=16, mamba_headdim=16,
    mamba_dt_rank=8, time_step_rank=8, state_size=16, mamba_d_state=16, mamba_chunk_size=4, chunk_size=4,
    num_blocks=2, adapter_rank=8, laurel_rank=8,
    # per-layer inputs (Gemma 3n, Gemma 4)
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=512,
    # encoder-decoder families (BART, mBART, Marian, Pegasus, Whisper, T5, ...)
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, d_ff=128, d_kv=16, num_decoder_layers=2,
    # Qwen4-exp's sparse indexer
    indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2,
)
# What the generic sizes leave inconsistent for a few architectures.
PER_TYPE: dict[str, dict[str, Any]] = {
    "dots1": dict(n_shared_experts=1),  # its default is None, which the model does not accept
    "falcon_h1": dict(mamba_d_ssm=None),  # the Mamba width from hidden_size and mamba_expand
    "gemma3n_text": dict(num_kv_shared_layers=0),  # its default shares 15 layers' caches
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),  # its default: Mamba only
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # LM head only as a decoder; axial position embeddings that sum to hidden_size and
    # whose shape multiplies to max_position_embeddings
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[32, 32], axial_pos_shape=[16, 16]),
    "xlstm": dict(qk_dim_factor=1.0),  # its chunked mLSTM kernel failed with query/key heads half the value heads'
    "xmod": dict(default_language="en_XX"),  # the adapter its forward uses
    "zaya": dict(num_experts_per_tok=1),  # the only value it supports
    # two hybrid layers: the shared transformer's weights are tied from the first to the others
    "zamba": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2),
}
# Layer patterns: one layer of each kind, in the order the full model first uses them.
PATTERNS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types")
MAX_PARAMETERS = 50_000_000
# --dtype: the torch dtype, and the default --rtol (the mode's reduction order is not
# torch's; in bfloat16 a logit's last bits differ more)
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 5e-2)}


def small_config(model_type: str) -> Any:
    """``model_type``'s config with the generic small sizes, token ids inside the small
    vocabulary, and every kind of layer of its pattern present; a composite model's
    sub-configs (a multimodal model's text and vision towers) small too."""
    import transformers

    sizes = _small_sizes(transformers.AutoConfig.for_model(model_type))
    sizes.update(PER_TYPE.get(model_type, {}))
    return transformers.AutoConfig.for_model(model_type, **sizes)


def _small_sizes(config: Any) -> dict[str, Any]:
    """The constructor arguments that make ``config`` small (see ``small_config``)."""
    import transformers

    default = config.to_dict()
    aliases = getattr(config, "attribute_map", {})  # hidden_size -> d_model and the like
    sizes: dict[str, Any] = {}
    for key, value in SIZES.items():
        if aliases.get(key, key) in default:
            sizes[aliases.get(key, key)] = value
    if "qk_rope_head_dim" in default:  # multi-head latent attention: head_dim is the rotary part,
        sizes["head_dim"] = SIZES["qk_rope_head_dim"]  # and a head per query head
        sizes["num_key_value_heads"] = SIZES["num_attention_heads"]
    if default.get("q_lora_rank") is not None:
        sizes["q_lora_rank"] = 32
    if default.get("num_heads") is not None and aliases.get("num_attention_heads") != "num_heads":
        # Mamba-2's heads (head_dim each: hidden * expand / head_dim) and xLSTM's
        sizes["num_heads"] = 4 if "head_dim" not in default else 8
    patterns = {k: list(dict.fromkeys(default[k])) for k in PATTERNS if isinstance(default.get(k), list) and default[k]}
    layers = max([2, *map(len, patterns.values())])
    for key, kinds in patterns.items():
        sizes[key] = [kinds[i % len(kinds)] for i in range(layers)]
    for key in ("num_hidden_layers", "n_layer", "num_layers", "num_blocks"):
        if key in sizes:
            sizes[key] = layers
    if isinstance(default.get("hybrid_layer_ids"), list):  # Zamba2: the shared attention block's layers
        sizes["hybrid_layer_ids"] = [layers - 1]
    for key in ("attn_layer_period", "expert_layer_period"):  # Jamba: every second layer
        if key in default:
            sizes[key], sizes[key.replace("period", "offset")] = 2, 1
    if "attn_layer_indices" in default:  # Bamba, GraniteMoeHybrid
        sizes["attn_layer_indices"] = [layers - 1]
    vocab = sizes.get(aliases.get("vocab_size", "vocab_size"))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        value = default.get(key)
        if vocab is not None and isinstance(value, int) and value >= vocab:
            sizes[key] = 0
        elif vocab is not None and isinstance(value, list):
            sizes[key] = [v if v < vocab else 0 for v in value]
    for key, value in default.items():
        # only keys that hold a config (another getattr may raise: Gemma 4's per-layer ones)
        sub = getattr(config, key) if isinstance(value, dict) and "model_type" in value else None
        if isinstance(sub, transformers.PretrainedConfig):
            sizes[key] = {"model_type": value["model_type"], **_small_sizes(sub)}
    return sizes


@dataclass
class Outcome:
    model_type: str
    status: str  # "passed", "failed", "skipped"
    reason: str = ""
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    # from the trace's coverage_report: ops the mode leaves to torch, and (portable mode)
    # ops whose bits come from this machine's math library
    uncovered: list[str] = field(default_factory=list)
    not_portable: list[str] = field(default_factory=list)
    # from check_computed_buffers: tables built with torch's math library that differ from
    # the portable values ("name: differing/numel"), and those it could not recompute
    buffers_differing: list[str] = field(default_factory=list)
    buffers_unchecked: list[str] = field(default_factory=list)


# --task vision: what generic image inputs leave inconsistent ("vision_config.x": the tower's
# field). Gemma 3 pools its patches into mm_tokens_per_image tokens, fewer than the small
# tower's patches; Idefics3's connector shuffles a side of patches divisible by its factor.
_SMALL_TILES = {"vision_config.image_size": 32, "vision_config.patch_size": 8}
# LLaVA-NeXT's "anyres": one 224 x 448 resolution, so an image is its base view and two crops
_ANYRES = {"image_grid_pinpoints": [[224, 448]]}
VISION_PER_TYPE: dict[str, dict[str, Any]] = {"gemma3": dict(mm_tokens_per_image=16),
                                              "shieldgemma2": dict(mm_tokens_per_image=16), "idefics3": _SMALL_TILES,
                                              "smolvlm": _SMALL_TILES, "llava_next": _ANYRES,
                                              "llava_next_video": _ANYRES, "llava_onevision": _ANYRES,
                                              # VipLLaVA's five layers, of a 2-layer tower
                                              "vipllava": dict(vision_feature_layers=[-2, -1]),
                                              # Aria's projector: 16 queries for the small tower's 7 x 7 patches
                                              "aria": dict(projector_patch_to_query_dict={49: 16})}
# Inputs a type's get_image_features needs besides its pixels (images -> keyword arguments):
# VideoLLaMA3 merges each image's patches by its own factor.
VISION_INPUTS_PER_TYPE: dict[str, Any] = {
    "video_llama_3": lambda images: dict(image_merge_sizes=torch.tensor([1] * images)),
    # InstructBLIP's Q-Former reads the instruction too
    "instructblip": lambda images: dict(qformer_input_ids=torch.arange(3, 8).repeat(images, 1),
                                        qformer_attention_mask=torch.ones(images, 5, dtype=torch.long)),
}
TASKS = ("causal-lm", "seq2seq", "vision")


def _auto_class(task: str) -> Any:
    import transformers

    return {"seq2seq": transformers.AutoModelForSeq2SeqLM,
            "vision": transformers.AutoModelForImageTextToText}.get(task, transformers.AutoModelForCausalLM)


def _task_names(task: str) -> list[str]:
    from transformers.models.auto import modeling_auto

    return sorted({"seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                   "vision": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES}.get(
        task, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def image_inputs(model: Any, images: int = 2) -> dict[str, Any]:
    """Generic pixels for ``model.get_image_features``, by what it asks for: Qwen-VL's
    flattened patches of an 8 x 8 grid each (``image_grid_thw``), Kosmos-2.5's
    ``flattened_patches``, MiniCPM-V's packed patches with ``target_sizes``, SigLIP2's
    flattened patches with ``spatial_shapes``, Idefics' 5-D tiles with their pixel mask,
    LLaVA-NeXT's crops of an image at its first grid resolution with ``image_sizes``,
    Pixtral's ``image_sizes``, else a square batch at the tower's ``image_size``; plus
    ``VISION_INPUTS_PER_TYPE``'s extra inputs."""
    import inspect

    wanted = inspect.signature(model.get_image_features).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if all(p.kind in variadic for p in wanted.values()) and hasattr(model, "model"):  # a pass-through
        wanted = inspect.signature(model.model.get_image_features).parameters
    vision = model.config.vision_config
    g = torch.Generator().manual_seed(0)
    extra = VISION_INPUTS_PER_TYPE.get(model.config.model_type, lambda n: {})(images)
    if "image_grid_thw" in wanted:
        frames = getattr(vision, "temporal_patch_size", None)
        channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", 3)
        grid = dict(image_grid_thw=torch.tensor([[1, 8, 8]] * images), **extra)
        if frames is None:  # one image frame: each patch a (channels, patch, patch) tile (PaddleOCR-VL)
            return dict(pixel_values=torch.randn(images * 64, channels, vision.patch_size, vision.patch_size,
                                                 generator=g), **grid)
        return dict(pixel_values=torch.randn(images * 64, channels * frames * vision.patch_size**2, generator=g),
                    **grid)
    if "flattened_patches" in wanted:  # Pix2Struct style (Kosmos-2.5): row and column ids, then the patch
        ids = torch.stack([torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)], -1).float() + 1
        patches = torch.randn(images, 64, vision.patch_embed_hidden_size, generator=g)
        return dict(flattened_patches=torch.cat([ids.expand(images, -1, -1), patches], -1))
    if "target_sizes" in wanted:  # MiniCPM-V: NaViT-packed patches, an 8 x 8 grid each, side by side
        patch = vision.patch_size
        return dict(pixel_values=torch.randn(1, 3, patch, images * 64 * patch, generator=g),
                    target_sizes=torch.tensor([[8, 8]] * images))
    if "spatial_shapes" in wanted:  # SigLIP2 (LFM2-VL): flattened patches, an 8 x 8 grid each, and their mask
        patch = vision.patch_size
        return dict(pixel_values=torch.randn(images, 64, 3 * patch * patch, generator=g),
                    spatial_shapes=torch.tensor([[8, 8]] * images),
                    pixel_attention_mask=torch.ones(images, 64, dtype=torch.bool))
    side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    pixels = torch.randn(images, 3, side, side, generator=g)
    if "pixel_attention_mask" in wanted:
        return dict(pixel_values=pixels[:, None],
                    pixel_attention_mask=torch.ones(images, 1, side, side, dtype=torch.bool))
    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if "image_sizes" in wanted and pinpoints:  # LLaVA-NeXT: (images, crops + 1, 3, side, side)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        height, width = pinpoints[0]
        crops = image_size_to_num_patches((height, width), pinpoints, side)
        return dict(pixel_values=torch.randn(images, crops, 3, side, side, generator=g),
                    image_sizes=torch.tensor([[height, width]] * images))
    if "image_sizes" in wanted:
        return dict(pixel_values=pixels, image_sizes=torch.tensor([[side, side]] * images))
    return dict(pixel_values=pixels, **extra)


def _flat(out: Any) -> torch.Tensor:
    """Every tensor of ``get_image_features``' output (its pooled features where it has
    them, else its last hidden state), flattened and concatenated."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    if isinstance(out, (list, tuple)):
        return torch.cat([_flat(o) for o in out])
    pooled = getattr(out, "pooler_output", None)
    return _flat(pooled if pooled is not None else out.last_hidden_state)


def _build(model_type: str, dtype: torch.dtype = torch.float32, task: str = "causal-lm") -> Any:
    config = small_config(model_type)
    for key, value in (VISION_PER_TYPE.get(model_type, {}) if task == "vision" else {}).items():
        *path, field_name = key.split(".")
        setattr(functools.reduce(getattr, path, config), field_name, value)
    with torch.device("meta"):
        size = sum(p.numel() for p in _auto_class(task).from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters with these sizes")
    return _auto_class(task).from_config(config).to(dtype).eval()


def _failed(outcome: Outcome, reason: str) -> Outcome:
    outcome.status, outcome.reason = "failed", reason[:300]
    return outcome


def sweep_one(model_type: str, rtol: float, dtype: torch.dtype = torch.float32, task: str = "causal-lm") -> Outcome:
    import detkit
    from detkit.buffers import check_computed_buffers
    from detkit.mode import coverage_report, trace_ops

    torch.manual_seed(0)
    ids = torch.randint(3, 500, (2, 7))
    mask = torch.ones_like(ids)
    # a decoder's prompts are left padded, an encoder's right padded (as probe pads them)
    if task == "seq2seq":
        mask[1, -2:] = 0
    else:
        mask[1, :2] = 0
    decoder = {"decoder_input_ids": ids[:, :3]} if task == "seq2seq" else {}

    def run() -> torch.Tensor:
        if task == "vision":
            return _flat(model.get_image_features(**pixels)).float()
        logits = model(input_ids=ids, attention_mask=mask, **decoder).logits
        # T5's family starts decoding from the pad id, which its config leaves to generate
        unset = task == "seq2seq" and getattr(model.config, "decoder_start_token_id", None) is None
        start = {"decoder_start_token_id": 0} if unset else {}
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0, **start)
        return logits

    try:
        model = _build(model_type, dtype, task)
        if task == "vision":
            if not callable(getattr(model, "get_image_features", None)):
                raise TypeError("no get_image_features")
            pixels = {k: v.to(dtype) if v.is_floating_point() else v for k, v in image_inputs(model).items()}
        with torch.no_grad():
            reference = run()
    except Exception as err:  # noqa: BLE001 - any failure without the mode is the architecture's
        return Outcome(model_type, "skipped", f"does not run without the mode: {type(err).__name__}: {err}"[:300])
    with torch.no_grad():  # not inference_mode: there the trace sees composites undecomposed
        _, ops = trace_ops(run)
    coverage = coverage_report(ops)
    portable_coverage = coverage_report(ops, portable=True)
    outcome = Outcome(model_type, "passed", uncovered=sorted(coverage.uncovered),
                      not_portable=sorted({*portable_coverage.not_portable, *portable_coverage.uncovered}
                                          - set(coverage.uncovered)))
    checks = check_computed_buffers(model)  # reported, not fixed: both runs keep the tables torch built
    outcome.buffers_differing = [f"{c.name}: {c.differing}/{c.numel}" for c in checks if c.differing]
    outcome.buffers_unchecked = [f"{c.name}: {c.skipped}" for c in checks if c.skipped]
    scale = float(reference.abs().max()) or 1.0
    for portable in (False, True):
        label = "portable" if portable else "batch_invariant"
        try:
            with torch.no_grad(), detkit.batch_invariant(portable=portable) as bi:
                logits = run()
        except Exception as err:  # noqa: BLE001 - reported, the sweep goes on
            return _failed(outcome, f"{label}: raised {type(err).__name__}: {err}")
        outcome.max_rel_diff[label] = float((logits.double() - reference.double()).abs().max()) / scale
        problems = {"fell back": bi.uncovered(), "not portable": bi.not_portable() if portable else {}}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            return _failed(outcome, f"{label}: {problems}")
        if not outcome.max_rel_diff[label] <= rtol:
            return _failed(outcome, f"{label}: logits differ by {outcome.max_rel_diff[label]:.1e}")
    if outcome.uncovered:
        outcome.status, outcome.reason = "uncovered", f"left to torch: {', '.join(outcome.uncovered)}"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model types (default: every one of --task)")
    parser.add_argument("--json", type=Path, help="write the outcomes here (after each architecture)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the models' dtype")
    parser.add_argument("--task", choices=TASKS, default="causal-lm",
                        help="causal LMs (AutoModelForCausalLM), encoder-decoder models (AutoModelForSeq2SeqLM) or "
                             "the vision towers of image-text-to-text models (their get_image_features)")
    parser.add_argument("--rtol", type=float, help="logit difference allowed, relative to the largest (default: "
                        + ", ".join(f"{rtol:g} in {name}" for name, (_, rtol) in sorted(DTYPES.items())) + ")")
    args = parser.parse_args(argv)
    import transformers

    names = _task_names(args.task)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"error: not {args.task} model types here: {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    outcomes: list[Outcome] = []
    warnings.simplefilter("ignore")  # transformers' config and generation warnings, per model
    transformers.logging.set_verbosity_error()
    try:
        for i, name in enumerate(names, 1):
            outcome = sweep_one(name, args.rtol if args.rtol is not None else DTYPES[args.dtype][1],
                                DTYPES[args.dtype][0], args.task)
            outcomes.append(outcome)
            print(f"[{i}/{len(names)}] {name}: {outcome.status}{': ' + outcome.reason if outcome.reason else ''}",
                  flush=True)
            if args.json:
                args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    except KeyboardInterrupt:
        print(f"interrupted after {len(outcomes)} of {len(names)}", file=sys.stderr)
        return 130
    counts = {s: sum(o.status == s for o in outcomes) for s in ("passed", "uncovered", "failed", "skipped")}
    print(f"passed {counts['passed']}, uncovered {counts['uncovered']}, failed {counts['failed']}, skipped "
          f"{counts['skipped']} (do not run without the mode)")
    for label, field_name in (("left to torch", "uncovered"), ("not portable", "not_portable")):
        by_op: dict[str, list[str]] = {}
        for o in outcomes:
            for op in getattr(o, field_name):
                by_op.setdefault(op, []).append(o.model_type)
        for op, types in sorted(by_op.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"  {label}: {op} in {len(types)}: {', '.join(types)}")
    for label, field_name in (("computed buffer not portable", "buffers_differing"),
                              ("computed buffer unchecked", "buffers_unchecked")):
        for o in outcomes:
            for entry in getattr(o, field_name):
                print(f"  {label}: {o.model_type} {entry}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
