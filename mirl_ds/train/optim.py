"""AdamW with the MAE/MIRL weight-decay split, built from timm's own parameter grouping."""
import torch
from timm.optim import param_groups_weight_decay

from ..config.schema import OptimConfig

# Tokens and position embeddings carry no weight decay (SPEC §3), besides 1-D params and biases.
NO_WEIGHT_DECAY = ("*cls_token", "*mask_token", "*pos_embed",
                   "*mask_token.weight")   # the pipeline's tied mask-token module


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_finetune_optimizer(model: torch.nn.Module, optim: OptimConfig, layer_decay: float,
                             lr: float) -> torch.optim.AdamW:
    """AdamW over timm's layer-decay groups (MAE's ``param_groups_lrd``: cls/pos/patch-embed are
    layer 0, block i layer i+1, the rest the top; each group's ``lr_scale`` is
    ``layer_decay^(top - layer)``, applied by :func:`set_lr`; 1-D tensors get no weight decay)."""
    from timm.optim import param_groups_layer_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups_layer_decay(model, optim.weight_decay, no_weight_decay_list=skip,
                                      layer_decay=layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps)
