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
