"""initpipeline.gunicorn_conf, read the way Gunicorn reads ``-c python:MODULE``."""

from __future__ import annotations

from typing import Any

import pytest
from gunicorn.app.base import Application
from gunicorn.config import Config

from initpipeline.gunicorn import start_init_when_ready
from tests.conftest import ROOT


class ConfigOnly(Application):  # type: ignore[misc]
    """A Gunicorn application that only loads a config location (no command line)."""

    def __init__(self, location: str) -> None:
        self.location = location
        super().__init__()

    def load_config(self) -> None:
        self.load_config_from_module_name_or_filename(self.location)

    def load(self) -> Any:
        raise NotImplementedError


def config(location: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    # Gunicorn's defaults for bind and workers come from these, read at its import.
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    return ConfigOnly(location).cfg


def test_python_module_config_sets_gthread_and_the_when_ready_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = config("python:initpipeline.gunicorn_conf", monkeypatch)
    assert (cfg.worker_class_str, cfg.threads, cfg.timeout, cfg.graceful_timeout) == (
        "gthread",
        4,
        30,
        30,
    )
    assert cfg.keepalive == 5
    assert cfg.when_ready is start_init_when_ready
    assert cfg.preload_app is False
    assert cfg.max_requests == 0


def test_demo_config_reuses_it_and_adds_address_workers_and_access_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GUNICORN_BIND", raising=False)
    cfg = config(str(ROOT / "project" / "gunicorn.conf.py"), monkeypatch)
    assert (cfg.worker_class_str, cfg.threads, cfg.timeout) == ("gthread", 4, 30)
    assert cfg.when_ready is start_init_when_ready
    assert (cfg.bind, cfg.workers, cfg.accesslog) == (["127.0.0.1:8000"], 2, "-")


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def exception(self, msg: str) -> None:
        self.lines.append(("exception", msg))


class Server:
    def __init__(self) -> None:
        self.log = Log()


def test_when_ready_without_settings_module_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE")
    server = Server()
    assert start_init_when_ready(server) is None
    assert server.log.lines == [
        (
            "info",
            "initpipeline: DJANGO_SETTINGS_MODULE is not set in Gunicorn's environment, so "
            "START_ON_GUNICORN_READY is not read and the init is not started here",
        )
    ]


def test_when_ready_does_nothing_unless_the_setting_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server()
    assert start_init_when_ready(server) is None
    assert server.log.lines == []


class FakeServer:
    """What the hooks use of Gunicorn's arbiter: its log and config."""

    def __init__(self, workers: int = 2) -> None:
        self.lines: list[str] = []
        self.cfg = type("Cfg", (), {"workers": workers})()
        self.log = self

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    def exception(self, msg: str, *args: Any) -> None:
        self.lines.append("EXCEPTION " + msg % args)


def test_the_metrics_hooks_empty_the_folder_at_start_and_forget_a_dead_workers_gauges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from initpipeline.gunicorn import child_exit, on_starting

    cfg = config("python:initpipeline.gunicorn_conf", monkeypatch)
    assert (cfg.on_starting, cfg.child_exit) == (on_starting, child_exit)
    folder = tmp_path / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    server = FakeServer()
    on_starting(server)  # creates it
    # What an earlier server left, and then what two workers of this one write.
    (folder / "counter_99.db").write_bytes(b"old")
    on_starting(server)
    assert list(folder.iterdir()) == []
    for name in (
        "counter_101.db",
        "gauge_liveall_101.db",
        "gauge_livemax_101.db",
        "gauge_liveall_102.db",
    ):
        (folder / name).write_bytes(b"")
    child_exit(server, type("Worker", (), {"pid": 101})())
    # Its live gauges go; what it counted stays, and so does the other worker's gauge.
    assert sorted(p.name for p in folder.iterdir()) == ["counter_101.db", "gauge_liveall_102.db"]
    assert server.lines == []


def test_without_the_folder_a_server_of_several_workers_says_what_it_misses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from initpipeline.gunicorn import on_starting

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    server = FakeServer(workers=2)
    on_starting(server)
    assert server.lines == [
        "initpipeline: PROMETHEUS_MULTIPROC_DIR is not set, so the artifact load metrics of "
        "/init/metrics are those of the worker that answers, not of the server"
    ]
    alone = FakeServer(workers=1)
    on_starting(alone)
    assert alone.lines == []
