"""tests.settings, with Redis giving unacknowledged tasks back after 2 s instead of hours.

Redis then delivers a phase again while it still runs (celery#5935), and delivers the
phase of a killed worker again as soon as a worker polls: the tests see those copies meet
the heartbeat, recovery and the claim on the PhaseRun row.
"""

from tests.settings import *  # noqa: F403
from tests.settings import CELERY_BROKER_URL

if CELERY_BROKER_URL.startswith("redis"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": 2,
        # kombu sweeps unacknowledged messages every 10 s x 10 calls by default.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

# On purpose: visibility_timeout is far below the phases' timeout.
SILENCED_SYSTEM_CHECKS = ["initpipeline.W001"]
