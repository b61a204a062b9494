"""The configuration tree. Each field is documented where it is declared.

``None`` on a model field means "take the preset's value"; derived values (the learning rate
from the batch size, the segment bounds) are computed where they are used, never stored here.
"""
from dataclasses import dataclass, field

from ..data.synthetic import SyntheticSpec  # the generator's own spec is the config section


@dataclass
class ModelConfig:
    preset: str = "vit_demo"             # encoder preset, see mirl_ds/models/presets.py
    img_size: int | None = None          # overrides of the preset's encoder shape
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    # Decoder shape; a list gives one value per segment (all must agree: the decoders share
    # memories and the mask token).
    decoder_dim: int | list[int] | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None


@dataclass
class DegradationConfig:
    kind: str = "none"                   # none | zoom_in | zoom_out | fisheye | blur | decolorize
    view_size: int = 288                 # zoom_in: the clean view; the input is its centre img_size
    centre_weight: float = 0.8           # zoom_in: loss weight of the centre (input) region
    border_weight: float = 0.2           # zoom_in: loss weight of the outer band
    zoom_out_sizes: list[int] = field(default_factory=lambda: [96, 128, 160, 192])
    twist_range: list[float] = field(default_factory=lambda: [0.15, 0.25])
    blur_kernel_sizes: list[int] = field(default_factory=lambda: [9])
    blur_noise_std: float = 0.5          # spread of the noisy box kernel's weights
    saturations: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.6])


@dataclass
class FeatureLossConfig:
    enabled: bool = False                # InfoNCE against a momentum encoder (supp. B.1)
    weight: float = 1.0
    temperature: float = 0.2
    momentum: float = 0.996
    predictor_depth: int = 2


@dataclass
class PerceptualLossConfig:
    enabled: bool = False                # VGG perceptual loss (supp. B.1)
    weight: float = 1.0
    weights_path: str | None = None      # a local VGG state dict; nothing is downloaded
    arch: str = "vgg16"
    layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4])


@dataclass
class ObjectiveConfig:
    # mirl | mae | multi_decoder | coarse_to_fine | fine_to_coarse
    name: str = "mirl"
    segments: int | None = None          # G; None takes the preset's
    mask_ratio: float = 0.75             # 0 turns masking off (pure degradation objectives)
    norm_pix_loss: bool = True           # per-patch normalised target (always on for MIRL)
    did: str = "every"                   # every (official code) | first (paper text) | off
    weight_norm_pred: bool = True        # weight-normalised prediction layers, gain frozen at 1
    pair_weights: list[float] | None = None  # λ_g; None = 2/G each
    alternative_loss_omega: float | None = None  # set to use L† = ω·err(ŷ_g) + L_g
    coarse_sigma: float = 2.0            # Gaussian σ (pixels) for coarse/fine targets
    pretrain_depth: int | None = None    # truncated pre-training: only the first k blocks
    mae_decoder_dim: int = 512           # MAE's own decoder (objective: mae)
    mae_decoder_depth: int = 8
    mae_decoder_heads: int = 16
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    feature_loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    perceptual_loss: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)


@dataclass
class DataConfig:
    source: str = "synthetic"            # synthetic | imagefolder | shards
    root: str = "runs/data/synthetic"    # ImageFolder root (train/ and val/ inside)
    # source "shards": the manifest `mirl-ds shard` wrote (local path, http(s):// or s3://);
    # the DeepSpeed engine streams these, split by data-parallel rank.
    shards: str | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    micro_batch_size: int = 32           # per data-parallel rank and step
    num_workers: int = 0
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    # timm.data.IMAGENET_DEFAULT_MEAN / _STD, written out so that checking a config does not
    # import timm (tests/test_config.py holds them equal).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4              # lr = base_lr × global batch / 256
    lr: float | None = None              # absolute lr; overrides base_lr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05           # none on 1-D params, biases, tokens, pos-embeds
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    epochs: float = 800
    warmup_epochs: float = 40
    schedule: str = "cosine"             # cosine | step (÷10 at step_milestones × training)
    step_milestones: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_steps: int | None = None         # stop after this many steps (demo, tests)
    grad_clip: float | None = None


@dataclass
class CheckpointConfig:
    dir: str = "runs/checkpoints"
    save_every: int = 1000               # steps
    keep_last: int = 3
    resume: str = "auto"                 # auto (latest, if any) | none | <checkpoint dir>
    # Weights only (DeepSpeed's load_module_only) from this checkpoint folder, native or universal,
    # when `resume` finds nothing: optimizer, lr schedule and data start afresh at step 0.
    init_from: str | None = None


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"        # resolved config, logs, pictures
    log_every: int = 10
    tensorboard: bool = False
    csv: bool = True
    # Each data-reading rank appends the sample keys of every micro-batch to
    # <run_dir>/sample_keys/rank<R>.jsonl (with its stage and data-parallel rank): to audit which
    # replica saw what (the tests check pipeline stages see identical samples).
    sample_keys: bool = False


@dataclass
class ParallelConfig:
    # Pipeline stages per model replica; each stage holds whole MIRL segments (encoder blocks +
    # that segment's decoder), so it must divide G.  Data-parallel degree = world size / this.
    pipeline_stages: int = 1
    # Recompute each segment's encoder blocks in the backward pass (non-reentrant): activation
    # memory of a segment instead of all of them, for ~1/3 more compute.
    activation_checkpointing: bool = False


@dataclass
class FinetuneConfig:
    """Fine-tuning the encoder for classification (``mirl-ds finetune``; SPEC §3).  The optimizer,
    schedule and batch come from ``optim``/``data`` as for pre-training; the shipped
    ``finetune_*`` configs set the fine-tuning recipe there (betas 0.9/0.999, base lr 7.5e-4…)."""
    # Pre-training checkpoint to start from: a DeepSpeed checkpoint folder of any layout
    # (pipeline, ZeRO-1/2/3, universal) or a {'model': state_dict} file (MAE's format);
    # none = from random initialisation (the scratch baseline).
    init: str | None = None
    val_shards: str | None = None        # validation manifest (`mirl-ds shard … --split val`)
    num_classes: int | None = None       # default: the training manifest's class count
    global_pool: str = "avg"             # avg (MAE: mean of patch tokens + fc_norm) | token
    drop_path: float = 0.1
    layer_decay: float = 0.75            # lr × decay^(depth+1-layer); MAE's grouping via timm
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25                # random erasing
    # RandomResizedCrop's area range, timm's --scale (data.crop_scale is pre-training's).  Raise the
    # low end where a crop changes the label, e.g. [1.0, 1.0] for the synthetic mirror layout.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    ema_decay: float = 0.9998            # 0 disables the EMA of the weights
    eval_every: int = 0                  # steps between evaluations; 0 = once per epoch and at the end
    # Initialisation studies (MIRL §3): re-initialise the last k blocks after loading, or take
    # only the first k blocks from the checkpoint (a truncated pre-training).
    reinit_last: int = 0
    pretrained_blocks: int | None = None


@dataclass
class RunConfig:
    name: str = "mirl"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
