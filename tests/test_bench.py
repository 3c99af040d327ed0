"""The benchmark harness works on a tiny workload (the benchmarks never run in make test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow]


def test_bench_quick_writes_every_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "latest.json").read_text())
    assert set(data) >= {
        "meta",
        "first_response",
        "deploy",
        "redeploy",
        "memory",
        "hot_path",
        "throughput",
        "scale",
    }
    first = data["first_response"]["2"]
    assert first["ratios"]["bare Django"] == 1.0
    # The peers pay the init before their first answer; initpipeline does not.
    assert first["naive"] > first["initpipeline"]
    assert data["deploy"]["filesystem"]["initpipeline_s"] > 0
    assert data["hot_path"]["artifact_get_ns"] > 0
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
    assert "**1. Time to first response**" in (tmp_path / "latest.md").read_text()
