"""The benchmark harness works on a tiny workload (the benchmarks never run in make test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES, ROOT

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(900)  # beyond pytest's 300 s: the subprocess's own bound is 600 s
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
    from bench.overhead import CAUSES

    assert set(data) >= {
        "meta",
        "first_response",
        "startup",
        "deploy",
        "redeploy",
        "memory",
        "hot_path",
        "throughput",
        "warmup_rates",
        "flood",
        "big",
        "scale",
        "shards",
        "serving",
        "monitoring",
    }
    first = data["first_response"]["2"]
    assert first["ratios"]["bare Django"] == 1.0
    # The peers pay the init before their first answer; initpipeline does not.
    assert first["naive"] > first["initpipeline"]
    assert data["deploy"]["filesystem"]["initpipeline_s"] > 0
    assert data["hot_path"]["artifact_get_ns"] > 0
    assert set(data["startup"]["ratios"]) == {"to_startproject", "to_minimal"}
    assert data["flood"]["flooded_s"] > 0 and data["flood"]["answers_per_s"] > 0
    assert set(data["warmup_rates"]["ratios"]) == {"/init/readyz", "/"}
    big = data["big"]
    assert big["bytes"] == 64 * 1024 * 1024
    assert "skipped" in big or len(big["first_get"]["processes_2_4_s"]) == 3
    if "skipped" not in big:
        # sha256 and BLAKE3 side by side, of the same file.
        assert big["publish"]["sha256_s"] > 0 and big["publish"]["blake3_s"] > 0
        assert big["first_get"]["process_1_sha256_s"] > 0
    for files in ("40", "80"):
        assert list(data["scale"][files]["causes_s"]) == CAUSES
    shards = data["shards"]
    assert shards["deploy"]["one_s"] > 0 and shards["deploy"]["two_s"] > 0
    # Redis is there under INITPIPELINE_REQUIRE_SERVICES (CI); elsewhere it may be missing.
    if REQUIRE_SERVICES or "skipped" not in shards["cost"]:
        assert shards["cost"]["counts"]["8"]["many_s"] > 0
        # One shard's success costs the same queries at every shard count.
        assert list(shards["cost"]["queries"]) == ["8", "64", "1000"]
        assert len({q["queries"] for q in shards["cost"]["queries"].values()}) == 1
    serving = data["serving"]
    assert set(serving["runs"]) == {
        "in-request gthread x2 load-first",
        "background gthread x2 load-first",
    }
    for run in serving["runs"].values():
        assert run["requests"] > 0 and run["worker_timeouts"] == 0
    # A loader that holds the GIL past timeout: the heartbeat process keeps the worker.
    assert serving["gil"]["background"]["worker_timeouts"] == 0
    assert serving["gil"]["in-request"]["worker_timeouts"] >= 1
    scrape = data["monitoring"]["scrape"]
    # The same queries whatever the run's size (tests/test_metrics.py counts them too).
    assert scrape["phases"]["queries"] == scrape["shards"]["queries"] == [2]
    assert data["monitoring"]["tracing"]["exports"] > 0
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG")
    report = (tmp_path / "latest.md").read_text()
    assert "**Goals**" in report
    assert "**1. Time to first response**" in report
    assert "**9. Sharded phases**" in report
    assert "**10. Serving: no request waits for a load**" in report
    assert "**11. Monitoring**" in report


def test_the_bench_stops_at_once_when_the_run_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from types import SimpleNamespace

    from bench import harness

    class Failed(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # /init/readyz of a run whose last phase failed
            body = {
                "status": "fail",
                "checks": {
                    "artifact:lsa_docs": [{"componentType": "artifact", "status": "fail"}],
                    "phase:compute_lsa": [{"componentType": "phase", "status": "pass"}],
                    "phase:check_queries": [{"componentType": "phase", "status": "fail"}],
                },
            }
            data = json.dumps(body).encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Failed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    reason = "run 1 is failed: phase check_queries failed: AssertionError: only 1 of 5"
    monkeypatch.setattr(harness, "run_failure", lambda env: reason)
    running = SimpleNamespace(name="deploy-web", proc=SimpleNamespace(poll=lambda: None))
    try:
        # At once: waiting out the timeout would end in "not ready after 120 s" instead.
        with pytest.raises(SystemExit, match="the run failed \\(check_queries\\)") as stopped:
            harness.wait_ready(server.server_port, harness.Env(files=40), [running], timeout=120)  # type: ignore[list-item]
    finally:
        server.shutdown()
    assert reason in str(stopped.value)
