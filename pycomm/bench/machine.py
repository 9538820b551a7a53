"""What machine a measurement ran on: the facts every raw result file is stamped with."""
from __future__ import annotations

import os
import platform
import socket
from typing import Any, Dict

__all__ = ["cpu_model", "load", "machine"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    """The 1, 5 and 15 minute load averages ("0.52 1.10 1.35"): how busy the machine was."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> Dict[str, Any]:
    """Host name, CPU model, core count, platform string and the load average now."""
    return {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "platform": platform.platform(), "load": load()}
