"""What this machine has, for the dashboard's setup wizard: CPU, memory, disk and GPUs.

Owns `detect()`, read from `/proc` (through psutil) and, where it is installed, from
`nvidia-smi`: the control plane must not import jax to ask it for devices, and the
wizard only needs names and sizes. GPU answers are cached for a minute, since
`nvidia-smi` takes a noticeable fraction of a second. Must not import jax.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

NVIDIA_SMI_TIMEOUT_S = 3.0
GPU_CACHE_S = 60.0
_NVIDIA_QUERY = "--query-gpu=name,memory.total,memory.used,driver_version"

_gpu_cache: tuple[float, list[dict[str, Any]]] | None = None


def cpu_model(cpuinfo: str) -> str:
    """The CPU's marketing name from the text of /proc/cpuinfo ("" when it names none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
            return value.strip()
    return ""


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """GPUs from `nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version
    --format=csv,noheader,nounits` (memory in MiB); malformed lines are skipped."""
    gpus = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        name, total, used, driver = fields
        try:
            total_bytes, used_bytes = int(float(total) * 2**20), int(float(used) * 2**20)
        except ValueError:
            continue
        gpus.append(
            {
                "vendor": "nvidia",
                "name": name,
                "memory_bytes": total_bytes,
                "used_bytes": used_bytes,
                "driver": driver,
            }
        )
    return gpus


def _gpus() -> list[dict[str, Any]]:
    global _gpu_cache
    now = time.monotonic()
    if _gpu_cache is not None and now - _gpu_cache[0] < GPU_CACHE_S:
        return _gpu_cache[1]
    found: list[dict[str, Any]] = []
    command = shutil.which("nvidia-smi")
    if command:
        try:
            result = subprocess.run(
                [command, _NVIDIA_QUERY, "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
                check=False,
            )
            if result.returncode == 0:
                found = parse_nvidia_smi(result.stdout)
        except (OSError, subprocess.TimeoutExpired):
            found = []
    _gpu_cache = (now, found)
    return found


def detect(data_dir: Path) -> dict[str, Any]:
    """CPU (name, physical cores, threads), memory and the data dir's disk, all in bytes, and GPUs."""
    try:
        name = cpu_model(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        name = ""
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(data_dir if data_dir.exists() else Path.home())
    return {
        "cpu": {
            "model": name or platform.processor() or platform.machine(),
            "architecture": platform.machine(),
            "cores": psutil.cpu_count(logical=False) or os.cpu_count() or 0,
            "threads": os.cpu_count() or 0,
            "usable_threads": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
        },
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available},
        "disk": {"path": str(data_dir), "total_bytes": disk.total, "free_bytes": disk.free},
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
    }
