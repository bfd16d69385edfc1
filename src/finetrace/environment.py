"""What a run ran on: package versions, interpreter, hardware, threads, git commit.

Recorded with every run so that a result can be reproduced (and an auditor can see what produced it).
Package versions are read from installed metadata, without importing the packages.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata

from . import __version__

PACKAGES = (
    "finetrace",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
    "pyarrow",
    "numpy",
    "gguf",
)


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = __version__ if name == "finetrace" else metadata.version(name)  # the code running
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (``amx_bf16``, ``avx512_bf16``...); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16): there a bf16 GEMM
    runs 3-4x faster than fp32 (measured on a 2-core Xeon with AMX: 500-590 against 140-160 GFLOP/s for
    ``F.linear`` at 640 tokens); without it bf16 is emulated and many times slower than fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def git_commit(path: str | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def capture(seed: int | None = None, extra: dict | None = None) -> dict:
    """The environment record stored with a run."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }
    if seed is not None:
        env["seed"] = seed
    if extra:
        env.update(extra)
    return env
