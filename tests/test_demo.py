"""The demo's init holds in any environment: its quality check at every size we use.

The demo's phases register into the pipeline when imported, so they run in a subprocess
with the demo's own settings, not in the small pipeline these tests run with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: Every SEARCH_MAX_DOCS the README, the bench (--quick, the default 1500 and its scale
#: stage), the tests and make test-install use; 0 = no cap (the demo's default).
SIZES = [(1.0, 20), (1.0, 40), (1.0, 250), (0.5, 300), (1.0, 1500), (1.0, 3000), (1.0, 6000)]
SIZES += [(1.0, 0)]

CHECK_SAMPLES = """
import json, sys
from project.search.init_phases import KNOWN_QUERIES, _module_name, _source_files
out = []
for scale, cap in json.loads(sys.argv[1]):
    files = _source_files(scale, cap)
    names = {_module_name(p) for p in files}
    out.append({
        "scale": scale,
        "cap": cap,
        "count": len(files),
        "all": len(_source_files(scale, 0)),
        "unique": len(set(files)) == len(files),
        "missing": [m for _, m in KNOWN_QUERIES if not any(
            n == m or n.startswith(m + ".") for n in names)],
    })
print(json.dumps(out))
"""


def _demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.settings",
        "INITPIPELINE_VAR_DIR": str(tmp_path / "var"),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def test_the_known_queries_modules_are_in_every_sample(tmp_path: Path) -> None:
    code = "import django; django.setup()\n" + CHECK_SAMPLES
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(SIZES)],
        cwd=ROOT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    samples = json.loads(result.stdout.splitlines()[-1])
    for sample in samples:
        assert sample["missing"] == [], sample
        assert sample["unique"], sample
        if sample["cap"]:
            assert sample["count"] == min(sample["cap"], sample["all"]), sample


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["40", "300"])
def test_the_demo_passes_its_quality_check(tmp_path: Path, cap: str) -> None:
    scale = "0.5" if cap == "300" else "1"
    out = tmp_path / "plain"
    result = subprocess.run(
        [sys.executable, "-m", "bench.plain", str(out)],
        cwd=ROOT,
        env=_demo_env(tmp_path, SEARCH_MAX_DOCS=cap, SEARCH_SCALE=scale),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "search_report.json").read_text())
    assert report["checkable"] == 6
    assert report["hits"] * 2 >= report["checkable"], report
