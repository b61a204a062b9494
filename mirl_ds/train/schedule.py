"""Learning-rate schedules as pure functions of the step (nanoGPT style): resuming a run only
needs the step number, never a scheduler's saved state."""
import math

from ..config.schema import OptimConfig


def peak_lr(optim: OptimConfig, global_batch: int) -> float:
    """MAE's linear scaling rule: lr = base_lr × global batch / 256, unless lr is given."""
    return optim.lr if optim.lr is not None else optim.base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, optim: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` or the paper's step decay
    (÷10 at each milestone fraction of training, for long resumable runs)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if optim.schedule == "step":
        drops = sum(step >= m * total_steps for m in optim.step_milestones)
        return peak * 0.1**drops
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return optim.min_lr + (peak - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
