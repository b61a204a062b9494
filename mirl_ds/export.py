"""``mirl-ds export``: a checkpoint's encoder (or fine-tuned classifier) as a plain timm state dict.

The source is anything :func:`mirl_ds.engine.weights.read_weights` reads — a DeepSpeed folder
(pipeline ``layer_*`` files, ZeRO-1/2/3 shards, universal, plain) or a ``.pt``/``.pth`` file
(``{"model": sd}``, ``{"module": sd}``, a bare state dict).  What it holds is told by the names:

* ``encoder.*`` — this project's pre-training model (MIRL/MAE/…): the encoder is exported;
* ``head.weight`` without an ``encoder.`` prefix — a fine-tuned classifier (timm names);
* top-level ``blocks.*`` beside ``decoder_*`` — an MAE-format pre-training checkpoint.

The written state dict has timm ``VisionTransformer`` names and nothing else, so it loads with
``strict=True`` into the model :func:`build_timm_model` (or the printed line) makes:

* **encoder** — ``num_classes=0``.  A pre-training encoder ends in ``norm`` (the final LayerNorm
  of the last segment), which timm keeps only when it does not pool with ``fc_norm``: the export
  is therefore for ``global_pool='token'`` (``forward`` gives the normed cls token, MAE's linear
  probe feature; ``forward_features`` every normed token).  The encoder of a fine-tuned
  classifier pooled with ``'avg'`` ends in ``fc_norm`` instead and is exported for
  ``global_pool='avg'`` (the head dropped): the pooling follows the norm the weights carry.
* **classifier** — the whole model with its head, ``num_classes`` and ``global_pool`` as trained.

The shape (width, depth, patch, image size, MLP ratio) is read from the tensors themselves, so a
truncated pre-training (``objective.pretrain_depth``) exports the blocks it has.  The head count
is not in any tensor's shape: it comes from the config the checkpoint keeps, else ``num_heads``,
else timm's head width of 64 is assumed (and said).  The paper presets ViT-S/B/L map to timm's
registered ``vit_{small,base,large}_patch16_224``; the deep ones (S-54, B-24, B-48) to
``timm.models.vision_transformer.VisionTransformer(**kwargs)`` with the same shape.

Beside the weights, ``<out>.json`` records how to rebuild the model (arch or kwargs, pool,
classes), the source and its layout; a ``.safetensors`` file carries the same text in its
metadata.  Weights are written in fp32 (pipeline files hold bf16 under bf16 training: exact).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["ExportResult", "build_timm_model", "export", "load_exported", "timm_kwargs",
           "timm_model_for"]

FORMATS = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch"}
WHAT = ("auto", "encoder", "classifier")
DEFAULT_HEAD_DIM = 64          # timm's ViT-S/B/L all use 64-wide heads
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ExportResult:
    out: str
    info_path: str
    what: str                      # encoder | classifier
    timm_arch: str | None          # a registered timm model, or None (build from kwargs)
    timm_kwargs: dict              # VisionTransformer(**timm_kwargs) rebuilds it either way
    num_heads_from: str            # config | num_heads argument | assumed (head width 64)
    source: str
    layout: str                    # read_weights' layout: pipeline | zero | universal | deepspeed | file
    source_kind: str               # pretraining | mae | classifier
    tensors: int
    parameters: int
    regenerated: list[str] = field(default_factory=list)   # frozen tensors the checkpoint lacked

    @property
    def create_line(self) -> str:
        """The Python line that builds the matching timm model."""
        if self.timm_arch:
            kw = self.timm_kwargs
            return (f"timm.create_model({self.timm_arch!r}, num_classes={kw['num_classes']}, "
                    f"global_pool={kw['global_pool']!r})")
        args = ", ".join(f"{k}={v!r}" for k, v in self.timm_kwargs.items())
        return f"timm.models.vision_transformer.VisionTransformer({args})"

    def summary(self) -> str:
        load = (f"safetensors.torch.load_file({self.out!r})" if self.out.endswith(".safetensors")
                else f"torch.load({self.out!r}, weights_only=True)")
        kind = {"pretraining": "pre-training", "mae": "MAE-format"}.get(self.source_kind, self.source_kind)
        lines = [f"exported the {self.what} of the {kind} checkpoint {self.source} "
                 f"({self.layout} layout): {self.tensors} tensors, {self.parameters / 1e6:.2f}M "
                 f"parameters, fp32 -> {self.out}",
                 f"rebuild it (also in {self.info_path}):",
                 f"  model = {self.create_line}",
                 f"  model.load_state_dict({load}, strict=True)"]
        if self.num_heads_from.startswith("assumed"):
            lines.append(f"note: the checkpoint keeps no config, so num_heads="
                         f"{self.timm_kwargs['num_heads']} is {self.num_heads_from}; pass --num-heads "
                         f"if it was trained with another head count (ViT-S-54 uses 12)")
        if self.regenerated:
            lines.append(f"note: {', '.join(self.regenerated)} absent from the checkpoint (frozen, not "
                         f"optimizer state); regenerated as the fixed 2-D sin-cos embedding it was")
        return "\n".join(lines)


# -- which tensors, and which timm model ----------------------------------------------------

def _source_kind(weights: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("encoder.") for k in weights):
        return "pretraining"
    if "head.weight" in weights:
        return "classifier"
    if any(k.startswith("blocks.") for k in weights):
        return "mae"
    raise ValueError("holds no ViT encoder: none of its tensors is named encoder.*, blocks.* or "
                     "head.weight (expected a mirl_ds pre-training, MAE-format or fine-tuned "
                     "classifier checkpoint)")


def _select(weights: dict[str, torch.Tensor], kind: str, what: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``(encoder | classifier, the tensors to export)`` for a request ``what``."""
    from .models.classifier import encoder_weights

    if what == "auto":
        what = "classifier" if kind == "classifier" else "encoder"
    if what == "classifier" and kind != "classifier":
        raise ValueError(f"holds a {'pre-training model' if kind == 'pretraining' else 'MAE-format model'} "
                         f"without a classification head; export its encoder (--what encoder)")
    sd = encoder_weights(weights)
    if what == "encoder":
        # A classifier's encoder is everything but its head (fc_norm stays: it is the encoder's
        # final norm under average pooling).
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return what, sd


def timm_kwargs(sd: dict[str, torch.Tensor], *, num_heads: int,
                img_size: int | None = None) -> dict:
    """``VisionTransformer`` keyword arguments whose parameters have exactly ``sd``'s shapes.

    ``img_size`` is only needed when ``sd`` lacks ``pos_embed`` (otherwise its length tells).
    """
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("has no patch embedding (patch_embed.proj.weight): not a ViT encoder")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise ValueError("has no transformer blocks (blocks.<i>.*): not a ViT encoder")
    class_token = "cls_token" in sd
    if "pos_embed" in sd:
        grid = round((sd["pos_embed"].shape[1] - int(class_token)) ** 0.5)
        img_size = grid * patch
    elif img_size is None:
        raise ValueError("has no pos_embed and keeps no config to tell the image size")
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
    if "blocks.0.mlp.fc1.weight" not in sd:
        raise ValueError("has no blocks.0.mlp.fc1.weight: not a complete ViT encoder")
    head = sd.get("head.weight")
    return dict(img_size=int(img_size), patch_size=int(patch), in_chans=int(in_chans),
                embed_dim=int(dim), depth=depth, num_heads=int(num_heads),
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token=class_token,
                num_classes=0 if head is None else int(head.shape[0]),
                # The norm the weights carry decides the pooling (see the module docstring).
                global_pool="avg" if "fc_norm.weight" in sd else "token")


def timm_model_for(kwargs: dict) -> str | None:
    """The registered timm model with exactly this shape (ViT-S/B/L at 224/16), else None."""
    from .models.presets import PRESETS

    shape = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    if not (kwargs["qkv_bias"] and kwargs["class_token"]):
        return None
    for p in PRESETS.values():
        if p.timm_arch and all(getattr(p, k) == kwargs[k] for k in shape):
            return p.timm_arch
    return None


def build_timm_model(timm_arch: str | None, kwargs: dict, device: str | torch.device | None = None):
    """The timm model an export loads into, with ``strict=True``."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with torch.device(device or "cpu"):
        if timm_arch:
            return timm.create_model(timm_arch, pretrained=False, num_classes=kwargs["num_classes"],
                                     global_pool=kwargs["global_pool"])
        return VisionTransformer(**kwargs)


def _check_loads(sd: dict[str, torch.Tensor], timm_arch: str | None, kwargs: dict) -> None:
    """Load ``sd`` strictly into the target model built on the meta device (no memory, no init)."""
    model = build_timm_model(timm_arch, kwargs, device="meta")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(f"does not form a timm VisionTransformer ({detail})") from None


# -- the config the checkpoint keeps ---------------------------------------------------------

def _stored_spec(path: Path):
    """The encoder preset of the config the checkpoint keeps, or None (no config, or not ours)."""
    from .config.loader import config_from_text
    from .config.validate import encoder_spec
    from .engine.init_encoder import stored_config_text

    try:
        text = stored_config_text(path)
        return encoder_spec(config_from_text(text)) if text else None
    except Exception:  # noqa: BLE001 - a config we cannot read only costs the head count
        return None


def _num_heads(dim: int, spec, num_heads: int | None) -> tuple[int, str]:
    if num_heads:
        return num_heads, "num_heads argument"
    if spec is not None and spec.embed_dim == dim and dim % spec.num_heads == 0:
        return spec.num_heads, "config"
    return max(dim // DEFAULT_HEAD_DIM, 1), f"assumed (head width {DEFAULT_HEAD_DIM}, as timm's ViT-S/B/L)"


def _fill_pos_embed(sd: dict[str, torch.Tensor], spec) -> list[str]:
    """A universal checkpoint keeps optimizer state only; the frozen sin-cos position embedding
    is not in it.  It is a function of the grid: rebuild it rather than refuse the export."""
    from .models.pos_embed import sincos_2d

    if "pos_embed" in sd or "patch_embed.proj.weight" not in sd or spec is None:
        return []
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    sd["pos_embed"] = sincos_2d(dim, spec.img_size // patch, cls_token="cls_token" in sd)
    return ["pos_embed"]


# -- writing -----------------------------------------------------------------------------------

def _format(out: Path) -> str:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"{out}: unknown weights format {out.suffix or '(no suffix)'!r}; "
                         f"name the output *.safetensors or *.pth")
    return fmt


def _write(sd: dict[str, torch.Tensor], out: Path, fmt: str, info: dict) -> None:
    # Own contiguous copies: tensors read from ZeRO shards are views into one flat buffer, which
    # safetensors refuses and torch.save would write whole (decoders and all).
    sd = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
          for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")        # no half-written file under the final name
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt", "mirl_ds_export": json.dumps(info)})
    else:
        torch.save(sd, tmp)
    os.replace(tmp, out)


def export(src: str | os.PathLike, out: str | os.PathLike, *, what: str = "auto",
           num_heads: int | None = None) -> ExportResult:
    """Write checkpoint ``src``'s encoder or classifier to ``out`` (``.safetensors``/``.pth``)
    and ``<out>.json``; raises ValueError/FileNotFoundError with one sentence on bad input."""
    from .engine.weights import read_weights

    src, out = Path(src), Path(out)
    fmt = _format(out)
    if what not in WHAT:
        raise ValueError(f"what={what!r}; choose one of {', '.join(WHAT)}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such checkpoint file or folder")
    weights, layout = read_weights(src)
    try:
        kind = _source_kind(weights)
        what, sd = _select(weights, kind, what)
        spec = _stored_spec(src)
        regenerated = _fill_pos_embed(sd, spec)
        if "patch_embed.proj.weight" not in sd:
            raise ValueError("has no patch embedding (patch_embed.proj.weight): not a ViT encoder")
        heads, heads_from = _num_heads(sd["patch_embed.proj.weight"].shape[0], spec, num_heads)
        kwargs = timm_kwargs(sd, num_heads=heads, img_size=spec.img_size if spec else None)
        arch = timm_model_for(kwargs)
        _check_loads(sd, arch, kwargs)
    except ValueError as e:
        raise ValueError(f"{src} {e}") from None
    info_path = out.with_name(out.name + ".json")
    result = ExportResult(out=str(out), info_path=str(info_path), what=what, timm_arch=arch,
                          timm_kwargs=kwargs, num_heads_from=heads_from, source=str(src.resolve()),
                          layout=layout, source_kind=kind, tensors=len(sd),
                          parameters=sum(v.numel() for v in sd.values()), regenerated=regenerated)
    info = dict(asdict(result), create=result.create_line, format=fmt, dtype="float32",
                weights=out.name)
    _write(sd, out, fmt, info)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return result


def load_exported(path: str | os.PathLike, device: str | torch.device | None = None):
    """The timm model of an export (from its ``<path>.json``), its weights loaded strictly."""
    path = Path(path)
    info = json.loads(path.with_name(path.name + ".json").read_text())
    model = build_timm_model(info["timm_arch"], info["timm_kwargs"], device=device)
    if _format(path) == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()
