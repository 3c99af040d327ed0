"""``requires_artifacts``: serve a view once its artifacts are active, "warming up" before."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.http import HttpRequest, HttpResponse

from .exceptions import ArtifactCorrupt, ArtifactLoadError, ArtifactNotReady
from .health import missing_artifacts
from .responses import warming_up
from .serving import pinned

logger = logging.getLogger("initpipeline")
V = TypeVar("V", bound=Callable[..., HttpResponse])


def requires_artifacts(*names: str) -> Callable[[V], V]:
    """Answer 503 "warming up" (HTML or JSON by ``Accept``) until ``names`` can be served.

    In a process that serves in the background, until this process has loaded them (no
    query, no wait); elsewhere, until the active generation has them (no query on the hot
    path, see ``REFRESH_INTERVAL``). The view's handles all serve one generation. An
    artifact that fails its checksum or its loader while the view loads it (not in the
    background) also gives a 503, and is logged.
    """
    wanted = list(names)

    def decorator(view: V) -> V:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            missing = missing_artifacts(wanted)
            if missing:
                return warming_up(request, missing)
            try:
                # Every handle the view uses serves the same generation, to its end.
                with pinned():
                    return view(request, *args, **kwargs)
            except ArtifactNotReady:
                return warming_up(request, list(names))
            except ArtifactCorrupt:
                logger.exception("a required artifact failed its checksum")
                return warming_up(request, list(names))
            except ArtifactLoadError:
                # Only where the view's process loads in the request (not in the
                # background): the background loader logs and retries on its own.
                logger.exception("a required artifact failed to load")
                return warming_up(request, list(names))

        return wrapped  # type: ignore[return-value]

    return decorator
