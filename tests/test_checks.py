"""The system checks: settings errors, one id per fault, and the deployment warnings W001...

Celery settings come from current_app.conf; pipeline defects are in tests/test_registry.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.test import override_settings

from initpipeline import checks
from initpipeline import registry as registry_module
from initpipeline.registry import Registry

CELERY_KEYS = (
    "broker_url",
    "broker_transport",
    "broker_transport_options",
    "task_always_eager",
    "task_acks_late",
    "task_annotations",
)


@pytest.fixture
def celery_conf() -> Iterator[Any]:
    """current_app.conf, put back as it was after the test. No CELERY_BROKER_TRANSPORT,
    as celery_settings() gives every broker but the filesystem."""
    conf = current_app.conf
    saved = {key: conf[key] for key in CELERY_KEYS}
    conf.broker_transport = None
    yield conf
    conf.update(saved)


def ids(found: list[Any]) -> list[str]:
    return [w.id for w in found]


# -- settings -------------------------------------------------------------------------------


def settings_errors() -> list[tuple[str, str]]:
    return [(e.id, e.msg) for e in checks.check_settings() + checks.check_pipeline()]


@override_settings(INITPIPELINE=["not", "a", "dict"])
def test_settings_that_are_not_a_dict() -> None:
    assert settings_errors() == [
        ("initpipeline.E001", "settings.INITPIPELINE must be a dict, not list.")
    ]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"NOPE": 1}, ("initpipeline.E013", "settings.INITPIPELINE has unknown keys: NOPE.")),
        (
            {"REFRESH_INTERVAL": -1},
            (
                "initpipeline.E014",
                "INITPIPELINE['REFRESH_INTERVAL'] must be a positive number, not -1.",
            ),
        ),
        (
            {"STALE_AFTER": "60"},
            (
                "initpipeline.E014",
                "INITPIPELINE['STALE_AFTER'] must be a positive number, not '60'.",
            ),
        ),
        (
            {"KEEP_GENERATIONS": 0},
            (
                "initpipeline.E015",
                "INITPIPELINE['KEEP_GENERATIONS'] must be an integer >= 1, not 0.",
            ),
        ),
        (
            {"WARMUP_PATHS": {"/search/": "lsa"}},
            (
                "initpipeline.E016",
                "INITPIPELINE['WARMUP_PATHS'] must map URL prefixes to lists of artifact names, "
                "not {'/search/': 'lsa'}.",
            ),
        ),
        (
            {"WARMUP_PATHS": {"/search/": ["ghost"]}},
            (
                "initpipeline.E017",
                "INITPIPELINE['WARMUP_PATHS']['/search/'] names 'ghost', which no phase produces.",
            ),
        ),
        (
            {"QUEUE": 3},
            (
                "initpipeline.E018",
                "INITPIPELINE['QUEUE'] must be the name of a Celery queue or None, not 3.",
            ),
        ),
        (
            {"DEFAULT_TIMEOUT": 10**9},
            (
                "initpipeline.E019",
                "INITPIPELINE['DEFAULT_TIMEOUT'] is 1000000000 s, more than a week.",
            ),
        ),
        (
            {"REQUIRED_ARTIFACTS": "b_out"},
            (
                "initpipeline.E020",
                "INITPIPELINE['REQUIRED_ARTIFACTS'] must be a list of artifact names, not 'b_out'.",
            ),
        ),
        (
            {"GC_AFTER_ACTIVATION": "yes"},
            (
                "initpipeline.E021",
                "INITPIPELINE['GC_AFTER_ACTIVATION'] must be True or False, not 'yes'.",
            ),
        ),
        (
            {"LOCAL_CACHE_DIR": 5},
            ("initpipeline.E022", "INITPIPELINE['LOCAL_CACHE_DIR'] must be a path or None, not 5."),
        ),
        (
            {"CELERY_APP": "project/celery.py"},
            (
                "initpipeline.E025",
                "INITPIPELINE['CELERY_APP'] must be the dotted path of a Celery app or None, "
                "not 'project/celery.py'.",
            ),
        ),
        (
            {"LOST_LIMIT": -1},
            ("initpipeline.E024", "INITPIPELINE['LOST_LIMIT'] must be an integer >= 0, not -1."),
        ),
        (
            {"METRICS_SHARDS": 1},
            ("initpipeline.E021", "INITPIPELINE['METRICS_SHARDS'] must be True or False, not 1."),
        ),
        (
            # The token itself is never shown: check output ends up in logs.
            {"METRICS_TOKEN": "s3cret"},
            (
                "initpipeline.E027",
                "INITPIPELINE['METRICS_TOKEN'] must be None or a string of at least 16 "
                "characters, not a string of 6 characters.",
            ),
        ),
        (
            {"METRICS_TOKEN": b"0123456789abcdef0123"},
            (
                "initpipeline.E027",
                "INITPIPELINE['METRICS_TOKEN'] must be None or a string of at least 16 "
                "characters, not a bytes.",
            ),
        ),
        (
            {"REQUIRED_ARTIFACTS": ["ghost"]},
            (
                "initpipeline.E008",
                "INITPIPELINE['REQUIRED_ARTIFACTS'] names 'ghost', which no phase produces.",
            ),
        ),
    ],
)
def test_each_settings_fault_has_its_own_id(
    given: dict[str, Any], expected: tuple[str, str]
) -> None:
    with override_settings(INITPIPELINE=given):
        assert settings_errors() == [expected]


def test_a_celery_app_that_cannot_be_imported_is_an_error() -> None:
    with override_settings(INITPIPELINE={"CELERY_APP": "nowhere.celery.app"}):
        found = checks.check_celery()
    assert ids(found) == ["initpipeline.E026"]
    assert found[0].msg.startswith(
        "INITPIPELINE['CELERY_APP'] = 'nowhere.celery.app' cannot be imported: No module named"
    )


@override_settings(STORAGES={"default": {"BACKEND": "django.core.files.storage.FileSystemStorage"}})
def test_missing_storage_alias_is_reported() -> None:
    assert ids(checks.check_settings()) == ["initpipeline.E007"]


def test_the_test_settings_raise_no_warning(celery_conf: Any) -> None:
    assert checks.check_celery() == []


def test_redis_visibility_timeout_shorter_than_a_phase_warns(celery_conf: Any) -> None:
    celery_conf.broker_url = "redis://127.0.0.1:6379/0"
    celery_conf.broker_transport_options = {"visibility_timeout": 600}
    [warning] = checks.check_celery()
    # The test phases have no timeout of their own: DEFAULT_TIMEOUT 3600 s + 30 s grace.
    assert warning.id == "initpipeline.W001"
    assert warning.msg == (
        "Redis visibility_timeout (600 s) is not longer than the longest a phase task stays "
        "unacknowledged (3630 s: its timeout plus the hard limit's grace, or a retry's "
        "countdown)."
    )
    assert '{"visibility_timeout": 7260}' in warning.hint
    celery_conf.broker_transport_options = {"visibility_timeout": 6 * 3600}
    assert checks.check_celery() == []


def test_redis_default_visibility_timeout_is_an_hour(celery_conf: Any) -> None:
    celery_conf.broker_url = "rediss://cache.example:6380/1"
    celery_conf.broker_transport_options = {}
    assert ids(checks.check_celery()) == ["initpipeline.W001"]
    with override_settings(INITPIPELINE={"DEFAULT_TIMEOUT": 600}):
        assert checks.check_celery() == []


def test_visibility_timeout_is_ignored_for_other_brokers(celery_conf: Any) -> None:
    celery_conf.broker_url = "amqp://guest@localhost//"
    celery_conf.broker_transport_options = {"visibility_timeout": 1}
    assert checks.check_celery() == []


def test_memory_broker_warns_unless_tasks_run_eagerly(celery_conf: Any) -> None:
    celery_conf.broker_url = "memory://"
    [warning] = checks.check_celery()
    assert warning.id == "initpipeline.W002"
    assert warning.msg.startswith("The Celery broker is memory://, which only reaches workers")
    celery_conf.task_always_eager = True
    assert checks.check_celery() == []


def test_the_filesystem_transport_with_another_brokers_url_is_an_error(celery_conf: Any) -> None:
    # celery_settings() for the filesystem broker, then CELERY_BROKER_URL set below it:
    # kombu takes the transport setting over the URL's scheme.
    celery_conf.broker_transport = "initpipeline.broker:FilesystemTransport"
    celery_conf.broker_url = "redis://:hunter2-secret@cache.internal:6379/0"
    [error] = [e for e in checks.check_celery() if e.id == "initpipeline.E032"]
    assert error.msg == (
        "CELERY_BROKER_TRANSPORT names initpipeline's filesystem transport, but "
        "CELERY_BROKER_URL is a redis:// URL: Celery would send and take the phases through "
        "the filesystem, not that broker."
    )
    assert "hunter2" not in error.msg + error.hint
    celery_conf.broker_url = "filesystem://localhost/"
    assert checks.check_celery() == []
    celery_conf.broker_transport = None
    celery_conf.broker_url = "redis://cache.internal:6379/0"
    assert "initpipeline.E032" not in ids(checks.check_celery())


def test_early_acks_for_long_phases_warn(celery_conf: Any) -> None:
    celery_conf.task_annotations = {"initpipeline.run_phase": {"acks_late": False}}
    [warning] = checks.check_celery()
    assert warning.id == "initpipeline.W003"
    assert warning.msg.startswith("Phase tasks are acknowledged early, and a phase may run 3630 s")
    # Short phases may ack early: a lost one is resent after STALE_AFTER anyway.
    with override_settings(INITPIPELINE={"DEFAULT_TIMEOUT": 120}):
        assert checks.check_celery() == []


def test_task_acks_late_false_does_not_reach_phase_tasks(celery_conf: Any) -> None:
    # run_phase sets acks_late=True itself, which wins over the project-wide default.
    celery_conf.task_acks_late = False
    assert checks.check_celery() == []
    celery_conf.task_annotations = [{"*": {"acks_late": False}}]
    assert ids(checks.check_celery()) == ["initpipeline.W003"]


def test_stale_after_shorter_than_three_heartbeats_warns() -> None:
    with override_settings(INITPIPELINE={"HEARTBEAT_INTERVAL": 5.0, "STALE_AFTER": 12.0}):
        [warning] = checks.check_celery()
    assert warning.id == "initpipeline.W005"
    assert warning.msg.startswith(
        "INITPIPELINE['STALE_AFTER'] (12 s) is less than three heartbeats (5 s each)"
    )


def test_phase_without_source_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    assert checks.check_code_sources() == []
    generated: dict[str, Any] = {"__name__": "generated"}
    exec("def made(ctx):\n    pass\n", generated)
    reg = Registry(_discovered=True)
    reg.phase(produces="x")(generated["made"])
    monkeypatch.setattr(registry_module, "registry", reg)
    [warning] = checks.check_code_sources()
    assert (warning.id, warning.obj) == ("initpipeline.W006", "made")
    assert warning.msg == (
        "phase 'made': no source found for generated.made; its code counts in the fingerprint "
        "through its bytecode, which differs between Python versions."
    )


class _SqliteFile:
    """A connection-like object on an SQLite file of the test's own: switching the journal
    mode of the shared test database would need every other connection to it closed."""

    vendor = "sqlite"

    def __init__(self, path: Path, mode: str) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute(f"PRAGMA journal_mode={mode}")

    @contextlib.contextmanager
    def cursor(self) -> Iterator[sqlite3.Cursor]:
        cur = self.db.cursor()
        try:
            yield cur
        finally:
            cur.close()


def test_sqlite_database_outside_wal_mode_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django.db

    fake = {
        "wal": _SqliteFile(tmp_path / "wal.sqlite3", "WAL"),
        "plain": _SqliteFile(tmp_path / "plain.sqlite3", "DELETE"),
    }
    monkeypatch.setattr(django.db, "connections", fake)
    assert checks.check_sqlite_wal() == []  # a database check: only when asked for
    assert checks.check_sqlite_wal(databases=["wal"]) == []
    [warning] = checks.check_sqlite_wal(databases=["wal", "plain"])
    assert warning.id == "initpipeline.W004"
    assert warning.msg.startswith(
        "The SQLite database 'plain' is in 'delete' journal mode, not WAL"
    )
