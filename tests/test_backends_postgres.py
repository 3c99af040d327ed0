"""PostgreSQL through DATABASE_URL, every process separate: migrate, worker, CLI.

The whole integration suite also runs on PostgreSQL (`make test-postgres`); this test
keeps PostgreSQL in `make test`, on a server of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Stack
from tests.servers import PostgresServer

pytestmark = [pytest.mark.slow]


def test_fresh_postgresql_database_migrates_and_runs_the_pipeline(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    stack = Stack("filesystem", tmp_path, None)
    # Its own var folder: its own database name (tests/settings.py), artifacts and broker.
    var = tmp_path / "var"
    stack.env.update(DATABASE_URL=postgres_server.url(), INITPIPELINE_VAR_DIR=str(var))
    with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE test_initpipeline_var")
    try:
        migrate = stack.manage("migrate", "--noinput")
        assert migrate.returncode == 0, migrate.stderr
        assert "Applying initpipeline.0001_initial... OK" in migrate.stdout

        stack.start_worker()
        result = stack.manage("start_init", "--wait")
        assert result.returncode == 0, result.stderr + stack.log()
        assert result.stdout.splitlines()[0] == "run 1 enqueued"

        status = stack.manage("init_status", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["state"] == "ready"
        assert sorted(a["name"] for a in data["active_generation"]["artifacts"]) == [
            "a_out",
            "b_out",
            "c_out",
        ]
        assert [(p["name"], p["state"]) for p in data["run"]["phases"]] == [
            ("a", "succeeded"),
            ("b", "succeeded"),
            ("c", "succeeded"),
        ]
    finally:
        stack.stop_workers()
