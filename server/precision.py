"""Which dtype the frozen CLIP is served in: ``--dtype auto`` picks bf16 where the hardware runs it fast.

Fast bf16 means matrix units or instructions made for it, detected on the machine, never assumed:
CUDA devices that support bf16 natively, and CPUs whose flags list AVX512-BF16 or AMX-BF16 (read
from ``/proc/cpuinfo`` where it exists, else from torch's own CPU probe). Everywhere else ``auto`` is
float32, because emulated bf16 is slower than float32. Weights, activations and the caches of pixels
and features are held in the served dtype; scores, the softmax and the loss are computed in float32
(``server/model.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import DTYPE_CHOICES

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPU_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU feature flags the kernel reports (the first ``flags`` line), or None where there is none."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 (``flags``: from :func:`cpu_flags` when not given)."""
    flags = cpu_flags() if flags is None else flags
    if flags is not None:
        return bool(flags & CPU_BF16_FLAGS)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's CPUID probe (no /proc here)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA with bf16, or a CPU with the flags above)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype`` -> the served dtype: ``auto`` is bf16 where :func:`has_fast_bf16`, else float32."""
    if name == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        log.warning("this CPU has no AVX512-BF16/AMX-BF16: bfloat16 is emulated and slower than float32")
    if device.type == "cpu" and dtype == torch.float16 and not (cpu_flags() or frozenset()) & CPU_FP16_FLAGS:
        log.warning("this CPU has no AVX512-FP16/AMX-FP16: float16 is emulated and slower than float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (as ``--dtype`` spells it)."""
    return str(dtype).removeprefix("torch.")
