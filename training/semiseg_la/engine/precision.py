"""Mixed precision on GPUs: bf16 where the card has it (Ampere and newer), else fp16 with loss scaling.

CPU autocast is slower than float32 on most CPUs, so the CPU always runs float32.
"""

from __future__ import annotations

from typing import Optional

import torch


def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for `device`, or None for float32."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def grad_scaler(dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and float32 need none (a pass-through scaler)."""
    return torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def device_name(device: str) -> str:
    """The device a run uses, for people: the GPU's name, or the CPU with its thread count."""
    if torch.cuda.is_available() and device != "cpu":
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads != 1 else ''}"
