"""Who may see the init's details: one rule for the admin pages and /init/status.json."""

from __future__ import annotations

from typing import Any


def can_see_details(user: Any) -> bool:
    """Progress details (messages, errors, tracebacks, artifacts) are for active staff who
    may view or change pipeline runs: the users the admin shows the progress pages to.

    Everyone else sees the public progress only (phase names, states and fractions).
    """
    return bool(
        user.is_active
        and user.is_staff
        and (
            user.has_perm("initpipeline.view_pipelinerun")
            or user.has_perm("initpipeline.change_pipelinerun")
        )
    )
