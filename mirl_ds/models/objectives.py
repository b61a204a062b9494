"""How the G decoder predictions become one loss (MIRL pairing and the paper's ablations)."""
import torch

from .choices import SEGMENTED_OBJECTIVES
from .targets import ReconstructionTarget


def pair_name(g: int, num_segments: int) -> str:
    """'pair_1_6': shallow decoder 1 with deep decoder G-1+1 (1-indexed, as in the paper)."""
    return f"pair_{g}_{num_segments - g + 1}"


def residual_pair_losses(preds: list[torch.Tensor], target: ReconstructionTarget,
                         pair_weights: list[float], omega: float | None = None):
    """MIRL: shallow g and deep G-g+1 are supervised only through their sum,
    ``L_g = err(ŷ_g + ŷ_{G-g+1})`` — the deep decoder learns the residual of the shallow one.

    With ``omega`` set this is the supplementary's alternative ``L†_g = ω·err(ŷ_g) + L_g``,
    which also pulls the shallow prediction towards the image on its own.
    """
    num_segments = len(preds)
    total, terms = 0.0, {}
    for g in range(num_segments // 2):
        shallow, deep = preds[g], preds[num_segments - 1 - g]
        loss_g = target.loss(shallow + deep)
        if omega is not None:
            loss_g = loss_g + omega * target.loss(shallow)
        terms[pair_name(g + 1, num_segments)] = loss_g
        total = total + pair_weights[g] * loss_g
    return total, terms


def independent_losses(preds: list[torch.Tensor], targets: list[torch.Tensor] | None,
                       target: ReconstructionTarget):
    """Multi-decoder (and coarse/fine): every decoder reconstructs its own target alone;
    the loss is their mean."""
    terms = {}
    for g, pred in enumerate(preds):
        terms[f"decoder_{g + 1}"] = target.loss(pred, None if targets is None else targets[g])
    return sum(terms.values()) / len(preds), terms


def coarse_fine_assignment(coarse: torch.Tensor, fine: torch.Tensor, num_segments: int,
                           coarse_first: bool) -> list[torch.Tensor]:
    """Table 2e: the shallow half of the decoders gets one component, the deep half the other."""
    shallow, deep = (coarse, fine) if coarse_first else (fine, coarse)
    half = num_segments // 2
    return [shallow] * half + [deep] * (num_segments - half)
