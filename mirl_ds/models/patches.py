"""Images <-> patch sequences, per-sample random masking and the per-patch-normalised target."""
import torch


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] in MAE's (row, col, p, p, C) order."""
    n, c, h, w = imgs.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = imgs.reshape(n, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """[N, L, p*p*C] -> [N, C, H, W] for a square grid (inverse of ``patchify``)."""
    n, length, _ = x.shape
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"{length} patches do not form a square grid")
    x = x.reshape(n, side, side, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, side * patch, side * patch)


def patch_mean_std(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + eps)`` [N, L, 1] of [N, L, p*p*C] patches.

    The variance is the unbiased one (torch's and Paddle's default), exactly as MAE's
    ``norm_pix_loss`` and the official MIRL code compute it. Mapping a normalised prediction
    back to pixels uses the same statistics.
    """
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps) ** 0.5


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised target ``(t - mean) / sqrt(var + eps)``."""
    mean, std = patch_mean_std(patches, eps)
    return (patches - mean) / std


def random_masking(num_samples: int, length: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None):
    """MAE's per-sample random masking by argsort of uniform noise.

    Returns ``ids_keep [N, K]`` (visible token indices, K = int(L * (1 - r))),
    ``ids_restore [N, L]`` (undoes the shuffle) and ``mask [N, L]`` (1 = masked, 0 = visible).
    Noise is drawn per sample, so every image gets its own mask.
    """
    len_keep = int(length * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} leaves no visible token out of {length}")
    # Drawn where the generator lives (torch refuses a CPU generator for a CUDA tensor).
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(num_samples, length, device=gen_device, generator=generator).to(device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(num_samples, length, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, ids_restore, mask


def keep_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """[N, L, D] -> [N, K, D]: the visible tokens in shuffled order."""
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_sequence(visible: torch.Tensor, mask_token: torch.Tensor,
                     ids_restore: torch.Tensor) -> torch.Tensor:
    """MAE's decoder input: [N, 1+K, D] (cls first) -> [N, 1+L, D].

    Mask tokens are appended after the visible tokens, the sequence is un-shuffled back to
    image order, and the cls token stays in front.
    """
    n, length = ids_restore.shape
    body = visible[:, 1:, :]
    fill = mask_token.expand(n, length - body.shape[1], -1).to(body.dtype)
    full = torch.cat([body, fill], dim=1)
    full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    return torch.cat([visible[:, :1, :], full], dim=1)
