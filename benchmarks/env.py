"""The environment a benchmark result was measured in: device resolution, vendor peaks, versions, commit.

``capture_env`` is what every results file stores under ``env``; ``results_folder`` names the folder of a
device and date (``benchmarks/results/<device-slug>-<YYYY-MM-DD>/``).

The benchmark scripts import this module (directly or through another benchmark module) before anything
from the repository: importing it puts the repository root on ``sys.path``, so that
``python benchmarks/<script>.py`` works from a checkout without an install (``PYTHONPATH=.`` also works).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# Device peaks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    """Vendor peak figures of one GPU model (dense, i.e. without structured sparsity)."""

    label: str
    mem_bw_bytes_s: float  # peak DRAM bandwidth, bytes/s
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    source: str


_NV_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100); sparse figures halved"
_NV_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200); sparse figures halved"
_NV_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100); sparse figures halved"

# (regex on torch.cuda.get_device_name(), peak). First match wins, so specific names come first. Dense
# figures are the datasheets' "with sparsity" tensor-core figures halved. Anything else (GH200 included,
# whose HBM differs by variant) is "unknown" and no fraction of peak is reported.
DEVICE_PEAKS: list[tuple[str, DevicePeak]] = [
    (r"H100.*PCIe", DevicePeak("H100 PCIe", 2.0e12, 756.5e12, _NV_H100)),
    (r"H100.*NVL", DevicePeak("H100 NVL", 3.9e12, 835.5e12, _NV_H100)),
    (r"H100", DevicePeak("H100 SXM5 (HBM3)", 3.35e12, 989.5e12, _NV_H100)),
    (r"(?<!G)H200.*NVL", DevicePeak("H200 NVL", 4.8e12, 835.5e12, _NV_H200)),
    (r"(?<!G)H200", DevicePeak("H200 SXM", 4.8e12, 989.5e12, _NV_H200)),
    (r"A100.*80GB.*PCIe", DevicePeak("A100 80GB PCIe", 1.935e12, 312e12, _NV_A100)),
    (r"A100.*80GB", DevicePeak("A100 80GB SXM4", 2.039e12, 312e12, _NV_A100)),
    (r"A100", DevicePeak("A100 40GB", 1.555e12, 312e12, _NV_A100)),
]


def lookup_peak(device_name: str) -> DevicePeak | None:
    """Return the vendor peaks of a device by its name, or None when the device is not in the table."""
    for pattern, peak in DEVICE_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    """Lower-case ``text`` and replace every run of non-alphanumerics by one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``; pass other values through.

    A CUDA device with an index (``cuda:N``) is made the current device (``torch.cuda.set_device``):
    CUDA events, the default stream and Triton launches follow the current device, not the tensors' one.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device} requested but torch.cuda.is_available() is False")
    index = torch.device(device).index
    if index is not None:
        if index >= torch.cuda.device_count():
            raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
    return device


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: str) -> str:
    """Human-readable device name: the CUDA device name, or ``CPU (<model>)``."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()})"


def device_slug(device: str) -> str:
    """Folder-name slug of a device, e.g. ``nvidia-h100-80gb-hbm3``; CPUs are ``cpu``."""
    return slugify(device_name(device)) if device.startswith("cuda") else "cpu"


def _run(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit() -> str | None:
    """Commit of the checkout, with ``-dirty`` when tracked files differ from it (None outside git)."""
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{sha}-dirty" if dirty else sha


def driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi, or None."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(module, "__version__", "unknown")


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def capture_env(device: str) -> dict[str, Any]:
    """Describe the machine and software a result was measured with."""
    import torch

    peak = lookup_peak(device_name(device)) if device.startswith("cuda") else None
    now = utc_now()
    return {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "is_cuda": device.startswith("cuda"),
        "peak": asdict(peak) if peak else "unknown",
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "dali": _module_version("nvidia.dali"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": driver_version() if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "git_commit": git_commit(),
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
    }


def results_folder(env: dict[str, Any], base: Path | None = None) -> Path:
    """``<base>/<device-slug>-<YYYY-MM-DD>``, created if needed."""
    folder = (base or RESULTS_DIR) / f"{env['device_slug']}-{env['date']}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    """Create the results folder of this device and date, write ``env.json`` into it, print its path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--base", type=Path, default=None, help="parent folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    found = capture_env(resolve_device(args.device))
    folder = results_folder(found, args.base)
    (folder / "env.json").write_text(json.dumps(found, indent=2) + "\n")
    print(folder)


if __name__ == "__main__":
    main()
