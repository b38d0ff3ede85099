"""Describe the machine the figures were measured on."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
from pathlib import Path

from .common import BenchError, run_tool
from .settings import TOOL_TIMEOUT_S


def describe_machine() -> dict[str, str]:
    """Name what the numbers were measured on."""
    meminfo = Path("/proc/meminfo").read_text()
    memory_kb = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": f"{memory_kb / 1024**2:.1f} GiB",
        "CPU": model.group(1).strip() if model else platform.processor() or "unknown",
        "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "python": platform.python_version(),
        "RabbitMQ": rabbitmq_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def rabbitmq_version() -> str:
    """Ask rabbitmqctl for the broker's version; say why when it cannot tell."""
    if shutil.which("rabbitmqctl") is None:
        return "unknown (no rabbitmqctl)"
    try:
        result = run_tool(["rabbitmqctl", "version"], TOOL_TIMEOUT_S)
    except BenchError as error:
        return f"unknown ({error})"
    return result.stdout.strip() if result.returncode == 0 else "unknown (rabbitmqctl failed)"
