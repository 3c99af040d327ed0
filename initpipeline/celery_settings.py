"""The Celery settings a project needs for long phases, on any broker, in a few lines.

::

    # settings.py
    from initpipeline.celery_settings import celery_settings

    globals().update(
        celery_settings(os.environ.get("CELERY_BROKER_URL"), folder=BASE_DIR / "var" / "broker")
    )

Nothing here imports Celery or reads a setting: a settings module calls it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: The broker URL schemes of kombu's Redis transport, where visibility_timeout applies.
REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")

#: Six hours: above the longest phase of most projects (DEFAULT_TIMEOUT is one hour).
VISIBILITY_TIMEOUT = 6 * 3600

#: kombu's filesystem transport, writing each message whole (broker.py), by the name kombu
#: resolves: importing it here would import kombu into every settings module.
FILESYSTEM_TRANSPORT = "initpipeline.broker:FilesystemTransport"

#: For phases that run for minutes to an hour (FIELD_NOTES, Celery and kombu).
LONG_PHASES: dict[str, Any] = {
    # The message is acknowledged when the phase ends, not when it starts, so a worker
    # that dies mid-phase does not lose it...
    "CELERY_TASK_ACKS_LATE": True,
    # ...and a pool process killed mid-phase (OOM, SIGKILL) puts it back in the queue
    # instead of acknowledging it as failed.
    "CELERY_TASK_REJECT_ON_WORKER_LOST": True,
    # A worker takes one phase at a time: the next one stays in the queue for a free
    # worker instead of waiting an hour behind the running one.
    "CELERY_WORKER_PREFETCH_MULTIPLIER": 1,
}


def filesystem_broker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``CELERY_BROKER_URL`` and ``CELERY_BROKER_TRANSPORT_OPTIONS`` for kombu's
    ``filesystem://`` transport under ``folder``, whose subfolders this creates.

    The processes of one host (web, workers, commands) share the queue through the folder:
    give them all the same one. kombu lists the folders without creating them. The
    transport is kombu's, with messages written by rename (``initpipeline.broker``).
    """
    root = Path(folder)
    queue, control, processed = root / "queue", root / "control", root / "processed"
    for path in (queue, control, processed):
        path.mkdir(parents=True, exist_ok=True)
    return {
        # A host name the transport ignores: without one, kombu warns "No hostname was
        # supplied. Reverting to default 'localhost'" at every connection.
        "CELERY_BROKER_URL": "filesystem://localhost/",
        # kombu's transport, writing each message whole before a consumer can take it
        # (initpipeline/broker.py: the plain one can stop a worker, kombu#1551).
        "CELERY_BROKER_TRANSPORT": FILESYSTEM_TRANSPORT,
        "CELERY_BROKER_TRANSPORT_OPTIONS": {
            # One folder both ways: every process sends to and reads from the same queue.
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "control_folder": str(control),
            "processed_folder": str(processed),
            "store_processed": False,
            # kombu looks at the folder once a second by default: up to a second lost
            # between two phases. A listdir every 100 ms costs nothing next to that.
            "polling_interval": 0.1,
        },
    }


def celery_settings(
    broker_url: str | None = None,
    *,
    folder: str | os.PathLike[str] | None = None,
    visibility_timeout: int = VISIBILITY_TIMEOUT,
) -> dict[str, Any]:
    """The ``CELERY_*`` settings for long phases on the broker at ``broker_url``.

    ``broker_url`` empty or ``filesystem://``: kombu's filesystem broker under ``folder``
    (required then; see ``filesystem_broker``). Redis (``redis://``, ``rediss://``...): a
    ``visibility_timeout`` of ``visibility_timeout`` seconds, which must exceed your longest
    phase, or Redis delivers a running phase to a second worker (celery#5935). Any other
    URL (``amqp://`` for RabbitMQ) is used as it is; RabbitMQ's own ``consumer_timeout``
    must exceed the longest phase (docs/deploy.md). Every case adds ``LONG_PHASES``.

    Returns a dict of setting names to values: ``globals().update(...)`` in a settings
    module, then set any of them again below that line to change it.
    """
    url = broker_url or "filesystem://"
    scheme = url.partition("://")[0].lower()
    if scheme == "filesystem":
        if folder is None:
            raise ImproperlyConfigured(
                "celery_settings(): the filesystem:// broker needs folder=, a folder every "
                "process of this host can write (for example BASE_DIR / 'var' / 'broker')."
            )
        broker = filesystem_broker(folder)
    elif scheme in REDIS_SCHEMES:
        broker = {
            "CELERY_BROKER_URL": url,
            "CELERY_BROKER_TRANSPORT_OPTIONS": {"visibility_timeout": visibility_timeout},
        }
    else:
        broker = {"CELERY_BROKER_URL": url}
    return {**broker, **LONG_PHASES}
