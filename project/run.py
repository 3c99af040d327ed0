"""``honcho`` for ``make demo`` and ``make dev``, with time for the worker to hand its
phases back when stopped.

On Ctrl-C honcho sends SIGTERM to each process and SIGKILL 5 s later (its KILL_WAIT). A
Celery worker takes about 6 s to leave even when idle (its loop looks for a stop every
2 s, then joins its pool's threads), and a running phase needs a moment to checkpoint and
hand itself back: killed at 5 s, the phase would be lost until recovery notices. So the
wait is longer here; a production supervisor's is its own (systemd's TimeoutStopSec,
Kubernetes' terminationGracePeriodSeconds: docs/deploy.md).

    python -m project.run start web worker
"""

import sys

from honcho import manager
from honcho.command import main

#: Seconds between honcho's SIGTERM and its SIGKILL: HANDOFF_GRACE (10 s) and the
#: worker's own exit, with room to spare.
manager.KILL_WAIT = 30

if __name__ == "__main__":
    sys.exit(main())
