"""The MIRL model as a DeepSpeed ``PipelineModule`` whose stages hold whole segments.

The layers are :func:`mirl_ds.models.pipeline_layers.segment_layers`: ``[mask token, segment
0, mask token, segment 1, …]`` — 2G layers, split evenly (``partition_method="uniform"``) into
``num_stages`` stages, so a stage boundary can only fall before a mask-token layer, i.e. at a
segment end.  The partition DeepSpeed computed is checked against exactly that.  The mask token
is a ``TiedLayerSpec``: each stage keeps a copy, DeepSpeed broadcasts it at start and sums its
gradients across stages, as the plain model's single shared token would have them.

Parameter names differ between the two layouts: the pipeline calls segment g's parameters
``"<2g+1>.<key>"`` (the layer's global index) and the token ``"tied_modules.mask_token.weight"``,
whatever the number of stages; the plain model calls them ``encoder.blocks.<i>…``,
``decoders.<g>…``, ``mask_token``.  :func:`pipeline_to_model_names` is the map between them
(universal checkpoints and weight loading use it).
"""
from __future__ import annotations

from deepspeed.pipe import PipelineModule, TiedLayerSpec

from ..models.mirl import SegmentedAutoencoder
from ..models.pipeline_layers import LossHead, MaskToken, SegmentLayer, segment_layers

__all__ = ["build_pipeline", "expected_parts", "pipeline_to_model_names", "PipelineSetupError", "TIED_KEY"]

TIED_KEY = "mask_token"


class PipelineSetupError(ValueError):
    pass


def expected_parts(num_segments: int, num_stages: int) -> list[int]:
    """Layer index where each stage starts (and the end): every stage gets G / stages segments."""
    per = 2 * num_segments // num_stages
    return [s * per for s in range(num_stages + 1)]


def build_pipeline(model: SegmentedAutoencoder, num_stages: int, *, checkpoint_blocks: bool = False,
                   topology=None) -> PipelineModule:
    """``model`` cut into ``num_stages`` stages at segment boundaries (its parameters are moved,
    not copied: drop ``model`` afterwards and the non-local segments are freed)."""
    g_count = model.num_segments
    if num_stages < 1 or g_count % num_stages:
        raise PipelineSetupError(
            f"parallel.pipeline_stages={num_stages} must divide the {g_count} MIRL segments: a stage "
            f"holds whole segments (use one of {[d for d in range(1, g_count + 1) if g_count % d == 0]})")
    tied_token = TiedLayerSpec(TIED_KEY, MaskToken, model.mask_token, tied_weight_attr=["weight"])
    layers = segment_layers(model, checkpoint_blocks, token_layer=tied_token)
    kwargs = {"topology": topology} if topology is not None else {"num_stages": num_stages}
    module = PipelineModule(layers=layers, loss_fn=LossHead(model), partition_method="uniform",
                            activation_checkpoint_interval=0, **kwargs)
    want = expected_parts(g_count, num_stages)
    if list(module.parts) != want:
        raise PipelineSetupError(f"DeepSpeed partitioned the {2 * g_count} layers as {list(module.parts)}, "
                                 f"not at the segment boundaries {want}")
    return module


def pipeline_to_model_names(model: SegmentedAutoencoder) -> dict[str, str]:
    """Every parameter/buffer name of the pipelined model (any stage count) -> the plain model's
    name for it.  Segment layers carry a copy of the frozen decoder position embedding each;
    all map to the model's one ``decoder_pos_embed``."""
    names = {f"tied_modules.{TIED_KEY}.weight": "mask_token"}
    for index, layer in enumerate(segment_layers(model)):
        if isinstance(layer, SegmentLayer):
            names.update({f"{index}.{key}": layer.model_key(key) for key in layer.state_dict()})
    return names
