"""What the launchers need to know about the GPU they launch on."""

from __future__ import annotations

import functools

import torch

DEFAULT_SM_COUNT = 132  # an H100/H200: what launch plans assume when no CUDA device is present (interpreter)


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launch plans ask on every call)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
