"""Records of runs, phase runs, artifacts and generations. History is never overwritten."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import digests


class RunState(models.TextChoices):
    PENDING = "pending", _("pending")
    RUNNING = "running", _("running")
    SUCCEEDED = "succeeded", _("succeeded")
    FAILED = "failed", _("failed")
    CANCELLED = "cancelled", _("cancelled")


class PhaseState(models.TextChoices):
    PENDING = "pending", _("pending")
    RUNNING = "running", _("running")
    SUCCEEDED = "succeeded", _("succeeded")
    CACHED = "cached", _("cached")
    FAILED = "failed", _("failed")
    UPSTREAM_FAILED = "upstream_failed", _("upstream failed")
    CANCELLED = "cancelled", _("cancelled")


IN_FLIGHT = (RunState.PENDING, RunState.RUNNING)
PHASE_DONE = (PhaseState.SUCCEEDED, PhaseState.CACHED)
PHASE_ENDED = (
    PhaseState.SUCCEEDED,
    PhaseState.CACHED,
    PhaseState.FAILED,
    PhaseState.UPSTREAM_FAILED,
    PhaseState.CANCELLED,
)


#: The phase states a worker may still change (the others are final).
PHASE_UNFINISHED = (PhaseState.PENDING, PhaseState.RUNNING)


class PipelineRunQuerySet(models.QuerySet["PipelineRun"]):
    def in_flight(self) -> PipelineRunQuerySet:
        return self.filter(state__in=IN_FLIGHT)

    def latest_first(self) -> PipelineRunQuerySet:
        return self.order_by("-created_at", "-id")


class PipelineRun(models.Model):
    """One execution of the pipeline."""

    # A constant column that lets the database enforce "one run in flight" with a
    # partial unique index: the single flight holds under any number of start_init calls.
    pipeline = models.CharField(max_length=64, default="default", editable=False)
    state = models.CharField(
        _("state"), max_length=16, choices=RunState.choices, default=RunState.PENDING
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    trigger = models.CharField(
        _("started by"), max_length=200, blank=True, help_text=_("Who or what started the run.")
    )
    options = models.JSONField(_("options"), default=dict, blank=True)
    error = models.TextField(_("error"), blank=True)

    objects = PipelineRunQuerySet.as_manager()

    class Meta:
        verbose_name = _("pipeline run")
        verbose_name_plural = _("pipeline runs")
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["pipeline"],
                condition=Q(state__in=["pending", "running"]),
                name="initpipeline_run_single_flight",
            )
        ]
        permissions = [
            ("start_run", "Can start, resume and run the init pipeline again"),
            ("cancel_run", "Can cancel a run of the init pipeline"),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.state})"

    @property
    def is_in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()


class PhaseRunQuerySet(models.QuerySet["PhaseRun"]):
    """Row guards: the conditions under which a copy of a phase task may write a row.

    A phase's row is its lock. Every claim of the row takes the next ``lease`` number, and a
    copy owns the row while it is ``running`` under the copy's lease; every write of a copy
    goes through ``owned()``, so a copy that lost the row (the run was cancelled, a stale
    phase was taken over, the phase was handed back) writes nothing.
    """

    def owned(self, pk: int, lease: int) -> PhaseRunQuerySet:
        """The row, while the copy holding ``lease`` runs it."""
        return self.filter(pk=pk, lease=lease, state=PhaseState.RUNNING)

    def held(self, pk: int, lease: int) -> PhaseRunQuerySet:
        """The row, while it is at ``lease`` and not finished (running or waiting)."""
        return self.filter(pk=pk, lease=lease, state__in=PHASE_UNFINISHED)

    def unfinished(self) -> PhaseRunQuerySet:
        return self.filter(state__in=PHASE_UNFINISHED)

    def stale(self, cutoff: datetime) -> PhaseRunQuerySet:
        """Rows with no sign of life since ``cutoff`` (no heartbeat at all counts as none)."""
        return self.filter(Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=cutoff))


class PhaseRun(models.Model):
    """One phase within one run."""

    run = models.ForeignKey(PipelineRun, on_delete=models.CASCADE, related_name="phases")
    name = models.CharField(_("phase"), max_length=200)
    position = models.PositiveIntegerField(_("position"))
    state = models.CharField(
        _("state"), max_length=16, choices=PhaseState.choices, default=PhaseState.PENDING
    )
    fingerprint = models.CharField(_("fingerprint"), max_length=64)
    version = models.CharField(_("version"), max_length=100)
    #: The phases this one waits for, as planned when the run started.
    depends_on = models.JSONField(_("depends on"), default=list, blank=True)
    #: What the fingerprint was made of (registry.Pipeline.fingerprint_recipes); empty in
    #: runs planned before code counted in fingerprints.
    recipe = models.JSONField(
        _("fingerprint recipe"),
        default=dict,
        blank=True,
        help_text=_(
            "What the fingerprint is made of: the sha256 of the code and of the config, the "
            "version, the artifacts produced and the inputs' fingerprints."
        ),
    )
    reason = models.CharField(
        _("reason"),
        max_length=200,
        blank=True,
        help_text=_("Why the phase runs, or why it is cached, as planned when the run started."),
    )
    attempt = models.PositiveIntegerField(
        _("attempt"),
        default=0,
        help_text=_("Attempts count failures (exceptions, timeouts); retries= allows more."),
    )
    max_attempts = models.PositiveIntegerField(_("attempts allowed"), default=1)
    #: Claims of the row: the owner of a running row is (row, lease).
    lease = models.PositiveIntegerField(_("lease"), default=0)
    losses = models.PositiveIntegerField(
        _("losses"),
        default=0,
        help_text=_("Times its worker vanished mid-phase; not attempts (LOST_LIMIT)."),
    )
    max_losses = models.PositiveIntegerField(_("losses allowed"), default=3)
    handoffs = models.PositiveIntegerField(
        _("hand-offs"), default=0, help_text=_("Times a worker shutting down handed it back.")
    )
    #: The attempt was interrupted (lost, handed off): the next claim continues it.
    interrupted = models.BooleanField(default=False)
    handoff_requested_at = models.DateTimeField(null=True, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    #: Since when workers running other code than planned have handed it back.
    waiting_since = models.DateTimeField(null=True, blank=True)
    #: The artifact names the phase was planned to produce (finish_run needs no code).
    produces = models.JSONField(_("produces"), default=list, blank=True)
    #: The latest checkpoint: storage key, digest, size, format, progress, time.
    checkpoint = models.JSONField(_("checkpoint"), null=True, blank=True)
    #: A shard's phase (this row is one of its tasks); blank for a phase's own row.
    shard_of = models.CharField(_("shard of"), max_length=200, blank=True)
    shard_index = models.PositiveIntegerField(_("shard"), null=True, blank=True)
    shard_count = models.PositiveIntegerField(_("shards"), null=True, blank=True)
    #: On a sharded phase's own row: its shards done (cached, or succeeded since), counted
    #: under the run's lock as each succeeds, so that a shard's success costs the same few
    #: queries whatever the count, and the one that completes the count sends the merge.
    shards_done = models.PositiveIntegerField(_("shards done"), default=0)
    timeout = models.PositiveIntegerField(_("timeout (s)"), null=True, blank=True)
    progress_done = models.FloatField(default=0)
    progress_total = models.FloatField(null=True, blank=True)
    message = models.CharField(_("message"), max_length=500, blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    worker = models.CharField(_("worker"), max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(_("heartbeat"), null=True, blank=True)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    error = models.TextField(_("error"), blank=True)
    traceback = models.TextField(_("traceback"), blank=True)

    objects = PhaseRunQuerySet.as_manager()

    class Meta:
        verbose_name = _("phase run")
        verbose_name_plural = _("phase runs")
        ordering = ["run", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "name"], name="initpipeline_phaserun_unique")
        ]
        indexes = [models.Index(fields=["name", "fingerprint"], name="initpipeline_phase_fp")]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"

    @property
    def progress(self) -> float:
        """Progress from 0 to 1."""
        if self.state in PHASE_DONE:
            return 1.0
        if not self.progress_total:
            return 0.0
        return max(0.0, min(1.0, self.progress_done / self.progress_total))

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or timezone.now()
        return (end - self.started_at).total_seconds()

    def heartbeat_age(self, now: datetime) -> float:
        """Seconds since the phase's last sign of life (infinite when it never showed one)."""
        seen = self.heartbeat_at or self.started_at
        return float("inf") if seen is None else (now - seen).total_seconds()

    def lost_reason(self, now: datetime) -> str:
        """Why this running phase, silent for STALE_AFTER, counts as lost (for its records)."""
        age = self.heartbeat_age(now)
        since = "ever" if age == float("inf") else f"{age:.0f} s"
        return (
            f"worker {self.worker or '?'} lost (loss {self.losses + 1} of {self.max_losses} "
            f"allowed) during attempt {self.attempt}: no heartbeat for {since}"
        )

    @property
    def out_of_losses(self) -> bool:
        """One more loss would exceed LOST_LIMIT."""
        return self.losses >= self.max_losses


class GenerationQuerySet(models.QuerySet["Generation"]):
    def active(self) -> Generation | None:
        """The active generation (at most one: initpipeline_one_active_generation)."""
        return self.filter(is_active=True).select_related("run").first()


class ArtifactQuerySet(models.QuerySet["Artifact"]):
    def for_fingerprint(self, name: str, fingerprint: str) -> ArtifactQuerySet:
        """Records of artifact ``name`` built with ``fingerprint``, newest first."""
        return self.filter(name=name, fingerprint=fingerprint).order_by("-created_at", "-id")


class Artifact(models.Model):
    """An immutable, checksummed file a phase published."""

    name = models.CharField(_("name"), max_length=200)
    fingerprint = models.CharField(_("fingerprint"), max_length=64)
    storage_key = models.CharField(_("storage key"), max_length=500)
    digest = models.CharField(
        _("digest"),
        max_length=200,
        help_text=_(
            "The file's content digest with its algorithm: blake3:<hex>, or sha256:<hex> for "
            "artifacts published before BLAKE3."
        ),
    )
    size = models.BigIntegerField(_("size (bytes)"))
    format = models.CharField(_("format"), max_length=16)
    metadata = models.JSONField(_("metadata"), default=dict, blank=True)
    failed_check = models.CharField(
        _("failed check"),
        max_length=500,
        blank=True,
        help_text=_(
            "Why a process found this file corrupt; such an artifact no longer counts as a "
            "cache, so the next run rebuilds it."
        ),
    )
    run = models.ForeignKey(
        PipelineRun, on_delete=models.PROTECT, related_name="artifacts", null=True
    )
    phase_run = models.ForeignKey(
        PhaseRun, on_delete=models.PROTECT, related_name="artifacts", null=True
    )
    created_at = models.DateTimeField(_("created"), default=timezone.now)

    objects = ArtifactQuerySet.as_manager()

    class Meta:
        verbose_name = _("artifact")
        verbose_name_plural = _("artifacts")
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["name", "fingerprint"], name="initpipeline_artifact_fp")]

    def __str__(self) -> str:
        return f"{self.name} {digests.short(self.digest)}"


class Generation(models.Model):
    """The artifacts of one successful run. Exactly one generation is active."""

    run = models.OneToOneField(PipelineRun, on_delete=models.PROTECT, related_name="generation")
    artifacts = models.ManyToManyField(Artifact, related_name="generations")
    fingerprints = models.JSONField(
        _("fingerprints"), default=dict, help_text=_("Phase name to fingerprint.")
    )
    is_active = models.BooleanField(_("active"), default=False)
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    activated_at = models.DateTimeField(_("activated"), null=True, blank=True)

    objects = GenerationQuerySet.as_manager()

    class Meta:
        verbose_name = _("generation")
        verbose_name_plural = _("generations")
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"],
                condition=Q(is_active=True),
                name="initpipeline_one_active_generation",
            )
        ]

    def __str__(self) -> str:
        return f"generation {self.pk}{' (active)' if self.is_active else ''}"

    def artifact_map(self) -> dict[str, Artifact]:
        return {a.name: a for a in self.artifacts.all()}


class WebProcessQuerySet(models.QuerySet["WebProcess"]):
    def reporting(self, *, within: float) -> WebProcessQuerySet:
        """Processes that reported in the last ``within`` seconds (the others are gone)."""
        return self.filter(reported_at__gte=timezone.now() - timedelta(seconds=within))


class WebProcess(models.Model):
    """A web process serving artifacts, as it last reported itself (serving.py): what it
    serves, what it is loading and what failed to load. Written by the process's loader
    thread when that changes and every minute; a row that stops being refreshed is a
    process that is gone."""

    key = models.CharField(_("key"), max_length=300, unique=True, help_text=_("host:pid:start"))
    host = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("process id"))
    server = models.CharField(
        _("server"),
        max_length=100,
        blank=True,
        help_text=_("The Gunicorn server (its master's process id) this worker belongs to."),
    )
    state = models.CharField(_("state"), max_length=20)
    generation = models.ForeignKey(
        Generation, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    serves = models.JSONField(
        _("serves"), default=dict, help_text=_("Artifact name to what is loaded of it.")
    )
    loading = models.JSONField(
        _("loading"), default=dict, help_text=_("Artifact name to when its load started.")
    )
    failures = models.JSONField(
        _("failures"), default=dict, help_text=_("Artifact name to its last failed load.")
    )
    started_at = models.DateTimeField(_("started"))
    reported_at = models.DateTimeField(_("reported"), db_index=True)

    objects = WebProcessQuerySet.as_manager()

    class Meta:
        verbose_name = _("web process")
        verbose_name_plural = _("web processes")
        ordering = ["host", "server", "pid"]

    def __str__(self) -> str:
        return f"{self.host} pid {self.pid}"


def trigger_label(user: Any = None, *, via: str) -> str:
    """A short "who or what started it" label, free of secrets."""
    if user is not None and getattr(user, "is_authenticated", False):
        return f"{via} by {user.get_username()}"
    return via


__all__ = [
    "Artifact",
    "Generation",
    "PhaseRun",
    "PhaseState",
    "PipelineRun",
    "RunState",
    "WebProcess",
]
