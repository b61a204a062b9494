"""One rank-aware logger: rank 0 prints progress, other ranks only warnings and errors."""
import logging
import os
import sys


def get_logger(name: str = "mirl_ds") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        rank = int(os.environ.get("RANK", "0"))
        handler = logging.StreamHandler(sys.stdout)
        prefix = f"[rank {rank}] " if "RANK" in os.environ else ""
        handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
    return logger
