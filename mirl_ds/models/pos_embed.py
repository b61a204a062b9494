"""Fixed 2-D sin-cos position embeddings, as MAE's ``get_2d_sincos_pos_embed``.

MIRL and MAE freeze these: they are a function of the grid, not learned. The cls token's row
is zero, so adding the embedding to the cls token is a no-op.
"""
import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: half sines, half cosines over geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (1 +) grid_size**2, dim] float32 embedding for a square patch grid.

    Half the channels encode the column (w) and half the row (h), in MAE's order, so that
    weights trained with MAE's embedding keep their meaning here.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE: meshgrid(w, h)
    emb = torch.cat([_sincos_1d(dim // 2, grid_w), _sincos_1d(dim // 2, grid_h)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
