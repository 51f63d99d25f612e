"""Shared benchmark helpers: timing medians, peak memory, machine description, results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB): VmHWM, the high-water mark of its own memory map.
    Not getrusage's ru_maxrss: Linux carries that across exec, so a benchmark child started by a parent that
    already held 2 GB would report the parent's peak as its own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), e.g. "AMD EPYC"; the architecture where it is not available."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
         "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
         "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    try:  # the CPU model and its widest vector unit (results depend on both)
        with open("/proc/cpuinfo") as f:
            info = f.read()
        d["cpu_model"] = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags")).split()
        d["simd"] = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    try:
        import triton
        d["triton"] = triton.__version__
    except ImportError:
        pass
    return d


def median_time(fn, runs: int = 5, warmup: int = 1) -> tuple[float, list]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def write_result(name: str, data: dict):
    out_dir = os.environ.get("OUT") or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": machine(), "date": time.strftime("%Y-%m-%d"), **data}, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


class RowWriter:
    """CSV rows written (and flushed) as they are measured, to ``<path>.partial``; renamed to ``path`` by close().
    A run cut short by a time limit keeps every row it measured in the .partial file, never a torn final file."""

    def __init__(self, path: str, fields: list):
        import csv
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self.path, self.partial = path, path + ".partial"
        self._f = open(self.partial, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=fields, extrasaction="ignore")
        self._w.writeheader()
        self._f.flush()

    def write(self, row: dict):
        self._w.writerow(row)
        self._f.flush()

    def close(self):
        self._f.close()
        os.replace(self.partial, self.path)
