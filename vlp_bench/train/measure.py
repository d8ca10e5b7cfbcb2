"""What a training run measures about the machine it runs on: device time (synchronised), peak
memory, and the device's peak FLOP/s for MFU.

Apart from the trainer so that what only measures (vlp-bench bench) can
use the same definitions without importing the training loop.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Protocol

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock read after it includes that work
    (CUDA runs asynchronously; a CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets, matched
# in order against torch.cuda.get_device_name(); set train.peak_tflops for anything else.
PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("A100", 312.0),
               ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.2)]


class PeakSetting(Protocol):
    """What peak_flops_per_s reads of a config (vlp_bench.train.trainer.TrainConfig)."""

    peak_tflops: float  # TFLOP/s set by the user; 0 = look the device up


def peak_flops_per_s(device: torch.device, cfg: PeakSetting) -> float | None:
    """The device's peak FLOP/s, the denominator of MFU: cfg.peak_tflops when set, else the
    data-sheet figure of a known CUDA device; None when unknown or on a CPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak for a CPU: MFU is reported on CUDA only
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def reset_peak_memory(device: torch.device) -> str:
    """Start a run's peak-memory window (the runs of an experiment share one process); returns the
    kind of peak that peak_memory_bytes() will then read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS (VmHWM) to the current RSS
        rss, hwm = _proc_status_bytes("VmRSS:"), _proc_status_bytes("VmHWM:")
    except (OSError, StopIteration, ValueError):
        return "process_max_rss"  # elsewhere: the peak since the process started, earlier runs included
    # A kernel or sandbox may accept the write and keep the old peak: then say so rather than report
    # an earlier run's peak as this run's (64 MiB of slack for memory freed since the reset).
    return "run_peak_rss" if hwm - rss < 64 * 2**20 else "process_max_rss"


def _proc_status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) * 1024


def peak_memory_bytes(device: torch.device) -> int:
    """The peak since reset_peak_memory() (of the kind it returned): CUDA's allocated bytes, or the
    process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return _proc_status_bytes("VmHWM:")
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return int(rss if sys.platform == "darwin" else rss * 1024)
