"""Config -> objects: the one place that knows both the config tree and the model classes."""
from torch import nn

from .config.schema import RunConfig
from .config.validate import encoder_spec
from .models.degradations import Degradation
from .models.mae import MaskedAutoencoder
from .models.masked_modeling import FeatureLoss, MaskedModeling, PerceptualLoss, ZoomIn
from .models.mirl import SegmentedAutoencoder


def build_degradation(cfg: RunConfig) -> nn.Module | None:
    d = cfg.objective.degradation
    if d.kind == "none":
        return None
    return Degradation(d.kind, input_size=encoder_spec(cfg).img_size, mean=tuple(cfg.data.mean),
                       std=tuple(cfg.data.std), zoom_out_sizes=tuple(d.zoom_out_sizes),
                       twist_range=tuple(d.twist_range), blur_kernel_sizes=tuple(d.blur_kernel_sizes),
                       blur_noise_std=d.blur_noise_std, saturations=tuple(d.saturations))


def pretrain_input_size(cfg: RunConfig) -> int:
    """Size of the clean images the data pipeline must deliver (zoom-in wants the larger view)."""
    d = cfg.objective.degradation
    return d.view_size if d.kind == "zoom_in" else encoder_spec(cfg).img_size


def build_pretrain_model(cfg: RunConfig) -> MaskedModeling:
    o, spec = cfg.objective, encoder_spec(cfg)
    d = o.degradation
    common = dict(
        mask_ratio=o.mask_ratio, norm_pix_loss=o.norm_pix_loss, pretrain_depth=o.pretrain_depth,
        degradation=build_degradation(cfg),
        zoom_in=ZoomIn(spec.img_size, d.centre_weight, d.border_weight) if d.kind == "zoom_in" else None,
        feature_loss=FeatureLoss(o.feature_loss.weight, o.feature_loss.temperature,
                                 o.feature_loss.momentum, o.feature_loss.predictor_depth)
        if o.feature_loss.enabled else None,
        perceptual_loss=PerceptualLoss(o.perceptual_loss.weights_path, o.perceptual_loss.weight,
                                       o.perceptual_loss.arch, tuple(o.perceptual_loss.layers))
        if o.perceptual_loss.enabled else None,
    )
    if o.name == "mae":
        return MaskedAutoencoder(spec, decoder_dim=o.mae_decoder_dim, decoder_depth=o.mae_decoder_depth,
                                 decoder_heads=o.mae_decoder_heads, **common)
    return SegmentedAutoencoder(
        spec, objective=o.name, segments=spec.segments, did=o.did,
        weight_norm_pred=o.weight_norm_pred, pair_weights=o.pair_weights,
        omega=o.alternative_loss_omega, coarse_sigma=o.coarse_sigma, **common)
