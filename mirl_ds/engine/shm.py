"""Removing the shared-memory buffers DeepSpeed's CPU all-reduce leaves behind.

On CPU ranks of one node DeepSpeed's shm comm op creates
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (about 69 MB
each) and never unlinks it: every run leaked one per rank until the machine ran out of memory.
At the end of a run, after a barrier (every rank has long mapped every buffer by then; a mapping
outlives its name), each rank unlinks its own.
"""
from __future__ import annotations

import os

import torch.distributed as dist


def release_shm_buffers() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass        # not a single-node CPU run: DeepSpeed made no such buffer
