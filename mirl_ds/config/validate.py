"""Whole-config checks: one sentence per problem, naming the key, the value and the fix."""
from pathlib import Path

from ..models.choices import DEGRADATION_KINDS, DID_PLACEMENTS, SEGMENTED_OBJECTIVES
from ..models.presets import PRESETS, VitPreset
from .schema import RunConfig

OBJECTIVES = ("mae", *SEGMENTED_OBJECTIVES)
DATA_SOURCES = ("synthetic", "imagefolder", "shards")
SCHEDULES = ("cosine", "step")


def encoder_spec(cfg: RunConfig) -> VitPreset:
    """The preset with the config's ``model.*`` overrides applied (decoder dim: first entry)."""
    m = cfg.model
    dec_dim = m.decoder_dim[0] if isinstance(m.decoder_dim, list) and m.decoder_dim else m.decoder_dim
    return PRESETS[m.preset].with_overrides(
        img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, decoder_dim=dec_dim,
        decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, segments=cfg.objective.segments)


def validate_config(cfg: RunConfig) -> list[str]:
    if cfg.model.preset not in PRESETS:
        return [f"model.preset={cfg.model.preset!r} is not a known preset; choose one of "
                f"{', '.join(PRESETS)}"]
    spec = encoder_spec(cfg)
    return (_model_problems(cfg, spec) + _objective_problems(cfg, spec)
            + _degradation_problems(cfg, spec) + _data_problems(cfg) + _optim_problems(cfg))


def _model_problems(cfg: RunConfig, spec: VitPreset) -> list[str]:
    p = []
    if spec.img_size % spec.patch_size:
        p.append(f"model.img_size={spec.img_size} is not a multiple of model.patch_size="
                 f"{spec.patch_size}; pick sizes that tile the image")
    if spec.embed_dim % spec.num_heads:
        p.append(f"model.embed_dim={spec.embed_dim} is not divisible by model.num_heads="
                 f"{spec.num_heads}; choose heads that divide the width")
    if spec.decoder_dim % spec.decoder_heads:
        p.append(f"model.decoder_dim={spec.decoder_dim} is not divisible by model.decoder_heads="
                 f"{spec.decoder_heads}; choose heads that divide the decoder width")
    dims = cfg.model.decoder_dim
    if isinstance(dims, list):
        if len(set(dims)) > 1:
            p.append(f"model.decoder_dim={dims} differs between segments; MIRL's decoders share "
                     f"memories and the mask token, so give every segment the same width")
        elif len(dims) != spec.segments:
            p.append(f"model.decoder_dim has {len(dims)} entries but there are {spec.segments} "
                     f"segments; give one width per segment or a single number")
    return p


def _objective_problems(cfg: RunConfig, spec: VitPreset) -> list[str]:
    o, p = cfg.objective, []
    if o.name not in OBJECTIVES:
        return [f"objective.name={o.name!r} is not one of {', '.join(OBJECTIVES)}"]
    if o.did not in DID_PLACEMENTS:
        p.append(f"objective.did={o.did!r} is not one of {', '.join(DID_PLACEMENTS)}")
    depth = spec.depth if o.pretrain_depth is None else o.pretrain_depth
    if o.pretrain_depth is not None and not 0 < o.pretrain_depth <= spec.depth:
        p.append(f"objective.pretrain_depth={o.pretrain_depth} must be between 1 and the encoder "
                 f"depth {spec.depth}")
    g = spec.segments
    if o.name != "mae":
        if g < 1:
            p.append(f"objective.segments={g} must be at least 1")
        elif depth % g:
            what = "objective.pretrain_depth" if o.pretrain_depth is not None else "model depth"
            p.append(f"{what} {depth} is not divisible by objective.segments={g}; choose G that "
                     f"divides the depth (e.g. {_divisors(depth)})")
        if o.name != "multi_decoder" and g % 2:
            p.append(f"objective.segments={g} is odd, but objective.name={o.name!r} pairs shallow "
                     f"decoder g with deep decoder G-g+1; use an even number of segments")
        if not o.norm_pix_loss:
            p.append(f"objective.norm_pix_loss=false is not allowed with objective.name={o.name!r}: "
                     f"MIRL targets are always per-patch normalised; remove the key")
        if o.pair_weights is not None and len(o.pair_weights) != g // 2:
            p.append(f"objective.pair_weights has {len(o.pair_weights)} entries but G={g} gives "
                     f"{g // 2} pairs; give one λ per pair or null for 2/G")
    elif o.mae_decoder_dim % o.mae_decoder_heads:
        p.append(f"objective.mae_decoder_dim={o.mae_decoder_dim} is not divisible by "
                 f"objective.mae_decoder_heads={o.mae_decoder_heads}")
    length = spec.num_patches
    if not 0 <= o.mask_ratio < 1 or int(length * (1 - o.mask_ratio)) < 1:
        p.append(f"objective.mask_ratio={o.mask_ratio} leaves {max(0, int(length * (1 - o.mask_ratio)))}"
                 f" of {length} tokens visible; use a ratio in [0, 1) that keeps at least one")
    return p + _extra_loss_problems(cfg)


def _extra_loss_problems(cfg: RunConfig) -> list[str]:
    o, p = cfg.objective, []
    plain = o.degradation.kind == "none" and o.name in ("mae", "mirl", "multi_decoder")
    for key, sub in (("feature_loss", o.feature_loss), ("perceptual_loss", o.perceptual_loss)):
        if sub.enabled and not plain:
            p.append(f"objective.{key}.enabled=true needs plain masked reconstruction "
                     f"(objective.degradation.kind=none and objective.name mae, mirl or multi_decoder)")
    pl = o.perceptual_loss
    if pl.enabled and not pl.weights_path:
        p.append("objective.perceptual_loss.weights_path is not set; point it to a local VGG state "
                 "dict (nothing can be downloaded at run time) or set enabled=false")
    elif pl.enabled and not Path(pl.weights_path).is_file():
        p.append(f"objective.perceptual_loss.weights_path={pl.weights_path} does not exist; download "
                 f"the VGG weights to that path or set objective.perceptual_loss.enabled=false")
    return p


def _degradation_problems(cfg: RunConfig, spec: VitPreset) -> list[str]:
    d, p = cfg.objective.degradation, []
    if d.kind not in DEGRADATION_KINDS:
        return [f"objective.degradation.kind={d.kind!r} is not one of {', '.join(DEGRADATION_KINDS)}"]
    if d.kind == "zoom_in":
        margin = d.view_size - spec.img_size
        if margin < 0 or margin % (2 * spec.patch_size):
            p.append(f"objective.degradation.view_size={d.view_size} must exceed model.img_size="
                     f"{spec.img_size} by a multiple of twice the patch size ({2 * spec.patch_size})")
        if cfg.objective.name in ("coarse_to_fine", "fine_to_coarse"):
            p.append(f"objective.degradation.kind=zoom_in does not combine with objective.name="
                     f"{cfg.objective.name!r}; use mae, mirl or multi_decoder")
    if d.kind in ("zoom_out",) and any(s > spec.img_size for s in d.zoom_out_sizes):
        p.append(f"objective.degradation.zoom_out_sizes={d.zoom_out_sizes} has sizes above "
                 f"model.img_size={spec.img_size}; the shrunk image must fit in the canvas")
    if len(d.twist_range) != 2 or d.twist_range[0] > d.twist_range[1]:
        p.append(f"objective.degradation.twist_range={d.twist_range} must be [low, high]")
    if any(k < 1 or k % 2 == 0 for k in d.blur_kernel_sizes):
        p.append(f"objective.degradation.blur_kernel_sizes={d.blur_kernel_sizes} must be odd and positive")
    return p


def _data_problems(cfg: RunConfig) -> list[str]:
    d, p = cfg.data, []
    if d.source not in DATA_SOURCES:
        p.append(f"data.source={d.source!r} is not one of {', '.join(DATA_SOURCES)}")
    if d.source == "shards" and not d.shards:
        p.append("data.source=shards needs data.shards: the manifest written by `mirl-ds shard` "
                 "(e.g. shards/synthetic/train.manifest.json)")
    try:
        d.synthetic.validate()
    except ValueError as e:
        p.append(f"data.synthetic: {e}")
    if d.micro_batch_size < 1:
        p.append(f"data.micro_batch_size={d.micro_batch_size} must be at least 1")
    for key, scale in (("data.crop_scale", d.crop_scale), ("finetune.crop_scale", cfg.finetune.crop_scale)):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            p.append(f"{key}={scale} must be [low, high] with 0 < low <= high <= 1")
    if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
        p.append("data.mean and data.std need three values each, std positive")
    return p


def _optim_problems(cfg: RunConfig) -> list[str]:
    o, p = cfg.optim, []
    if o.schedule not in SCHEDULES:
        p.append(f"optim.schedule={o.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if o.warmup_epochs > o.epochs:
        p.append(f"optim.warmup_epochs={o.warmup_epochs} exceeds optim.epochs={o.epochs}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        p.append(f"optim.betas={o.betas} must be two numbers in [0, 1)")
    if (o.lr if o.lr is not None else o.base_lr) <= 0:
        p.append("optim.lr / optim.base_lr must be positive")
    if cfg.checkpoint.keep_last < 1 or cfg.checkpoint.save_every < 1:
        p.append("checkpoint.keep_last and checkpoint.save_every must be at least 1")
    return p


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n + 1) if n % d == 0 and d % 2 == 0) or "1"
