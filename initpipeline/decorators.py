"""``requires_artifacts``: serve a view once its artifacts are active, "warming up" before."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from django.http import HttpRequest, HttpResponse

from .exceptions import ArtifactCorrupt, ArtifactNotReady
from .health import missing_artifacts
from .responses import warming_up

logger = logging.getLogger("initpipeline")
V = TypeVar("V", bound=Callable[..., HttpResponse])


def requires_artifacts(*names: str) -> Callable[[V], V]:
    """Answer 503 "warming up" (HTML or JSON by ``Accept``) until ``names`` are active.

    The check costs no query on the hot path (see ``REFRESH_INTERVAL``). An artifact that
    fails its checksum while the view loads it also gives a 503, and is logged.
    """
    wanted = list(names)

    def decorator(view: V) -> V:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            missing = missing_artifacts(wanted)
            if missing:
                return warming_up(request, missing)
            try:
                return view(request, *args, **kwargs)
            except ArtifactNotReady:
                return warming_up(request, list(names))
            except ArtifactCorrupt:
                logger.exception("a required artifact failed its checksum")
                return warming_up(request, list(names))

        return wrapped  # type: ignore[return-value]

    return decorator
