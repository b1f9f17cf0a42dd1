"""lpdist.benchmark.write_result: the JSON every benchmark writes names the device, the host CPU
(host-bound results depend on it) and the torch version beside the payload."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

from lpdist.benchmark import write_result


def test_result_file_names_device_host_cpu_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    path = write_result("bench_x", {"rows": [1, 2]})
    data = json.loads(Path(path).read_text())
    assert data["rows"] == [1, 2] and data["torch"] == torch.__version__
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    expected = model.group(1).strip() if model else (platform.processor() or "unknown")
    assert data["host_cpu"] == expected and data["host_cpu"]


def test_no_result_file_without_out(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert write_result("bench_x", {}) is None
