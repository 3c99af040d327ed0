"""celery_settings(): the Celery settings of a project, for each kind of broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from initpipeline import checks
from initpipeline.celery_settings import LONG_PHASES, celery_settings

LONG = {
    "CELERY_TASK_ACKS_LATE": True,
    "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
    "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
}


def test_filesystem_broker_under_a_folder_creates_its_folders(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "broker"
    found = celery_settings(None, folder=folder)
    queue = str(folder / "queue")
    assert found == {
        "CELERY_BROKER_URL": "filesystem://localhost/",
        "CELERY_BROKER_TRANSPORT": "initpipeline.broker:FilesystemTransport",
        "CELERY_BROKER_TRANSPORT_OPTIONS": {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": 0.1,
        },
        **LONG,
    }
    assert sorted(p.name for p in folder.iterdir()) == ["control", "processed", "queue"]
    # Called again by every process that reads the settings: the folders exist by then.
    assert celery_settings("filesystem://", folder=str(folder)) == found


def test_filesystem_broker_without_a_folder_says_what_to_set() -> None:
    with pytest.raises(ImproperlyConfigured, match="needs folder="):
        celery_settings("")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://cache.example:6380/1"])
def test_redis_gets_a_visibility_timeout_above_the_default_phase_timeout(url: str) -> None:
    assert celery_settings(url) == {
        "CELERY_BROKER_URL": url,
        "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": 6 * 3600},
        **LONG,
    }
    assert celery_settings(url, visibility_timeout=10)["CELERY_BROKER_TRANSPORT_OPTIONS"] == {
        "visibility_timeout": 10
    }


def test_rabbitmq_url_is_kept_as_given(tmp_path: Path) -> None:
    url = "amqp://guest:guest@127.0.0.1:5672//"
    assert celery_settings(url, folder=tmp_path / "unused") == {"CELERY_BROKER_URL": url, **LONG}
    assert not (tmp_path / "unused").exists()
    assert LONG_PHASES == LONG


@pytest.fixture
def celery_conf() -> Iterator[Any]:
    """current_app.conf, put back as it was after the test."""
    conf = current_app.conf
    keys = ("broker_url", "broker_transport", "broker_transport_options", "task_acks_late")
    saved = {key: conf[key] for key in keys}
    yield conf
    conf.update(saved)


def test_redis_settings_pass_the_deployment_checks(celery_conf: Any) -> None:
    found = celery_settings("redis://127.0.0.1:6379/0")
    celery_conf.update(
        broker_url=found["CELERY_BROKER_URL"],
        broker_transport=found.get("CELERY_BROKER_TRANSPORT"),
        broker_transport_options=found["CELERY_BROKER_TRANSPORT_OPTIONS"],
        task_acks_late=found["CELERY_TASK_ACKS_LATE"],
    )
    assert checks.check_celery() == []


def test_the_demo_settings_come_from_it() -> None:
    assert {name: getattr(settings, name) for name in LONG} == LONG
    assert current_app.conf.task_acks_late is True
