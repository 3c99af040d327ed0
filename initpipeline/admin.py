"""Read-only admin for the run records, a live progress view, and start, resume and cancel.

The records are history and are never edited by hand; the three actions go through
``services`` like the commands do, each behind its own permission.
"""

from __future__ import annotations

from dataclasses import asdict
from types import ModuleType
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from . import history
from .exceptions import EnqueueError, PipelineConfigError
from .formatters import fmt_duration
from .models import (
    IN_FLIGHT,
    Artifact,
    Generation,
    PhaseRun,
    PhaseState,
    PipelineRun,
    RunState,
    WebProcess,
    trigger_label,
)
from .permissions import can_see_details
from .reporting import PhaseReport, run_report, web_reports

#: Runs that "Resume from failure" accepts: their done phases are cached by fingerprint.
RESUMABLE = (RunState.FAILED, RunState.CANCELLED)


class ReadOnlyMixin:
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PhaseRunInline(ReadOnlyMixin, admin.TabularInline):  # type: ignore[type-arg]
    model = PhaseRun
    extra = 0
    fields = (
        "position",
        "name",
        "state",
        "reason",
        "attempt",
        "message",
        "started_at",
        "finished_at",
    )
    readonly_fields = fields
    ordering = ["position"]


def _services() -> ModuleType:
    """services.py, imported when a button is used: with it comes the whole execution
    stack, which cost every web process about 20 ms before its first answer."""
    from . import services

    return services


def _attempt_text(p: PhaseReport) -> str:
    """ "1/3", with the losses and hand-offs (the page's script writes the same)."""
    labels = _labels()
    text = f"{p.attempt}/{p.max_attempts}"
    if p.losses:
        text += " · " + labels["lost_count"] % {"n": p.losses, "max": p.max_losses}
    if p.handoffs:
        text += " · " + labels["handoffs"] % {"n": p.handoffs}
    return text


def _status_url(run_id: int) -> str | None:
    """/init/status.json for this run, if the project includes initpipeline.urls."""
    try:
        return f"{reverse('initpipeline:status')}?run={run_id}"
    except NoReverseMatch:
        return None


def _labels() -> dict[str, Any]:
    """The words the page's script shows, translated here (it carries no catalog)."""
    return {
        "states": {**dict(PhaseState.choices), **dict(RunState.choices)},
        "left": gettext("about %(time)s left"),
        "leftUnknown": gettext("unknown (no earlier run of every phase to go by)"),
        "leftNone": gettext("none"),
        "cached": gettext("cached"),
        "previousRun": gettext("previous successful run"),
        "lost": gettext("Lost contact with the server; retrying."),
        # Losses and hand-offs are not attempts: a worker vanished, or shut down.
        "lost_count": gettext("%(n)s of %(max)s lost"),
        "handoffs": gettext("%(n)s handed off"),
        "stopped": gettext("Live updates stopped: %(reason)s"),
    }


@admin.register(PipelineRun)
class PipelineRunAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "id",
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "duration_display",
        "trigger",
        "progress_link",
    ]
    list_filter = ["state"]
    readonly_fields = [
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "trigger",
        "options",
        "error",
    ]
    exclude = ["pipeline"]
    inlines = [PhaseRunInline]
    actions = ["cancel_runs"]

    # -- permissions (the custom ones on PipelineRun.Meta) --------------------------------

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The rule /init/status.json applies too, so the pages never poll into a 403.
        return can_see_details(request.user)

    def has_start_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.start_run")

    def has_cancel_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.cancel_run")

    # -- changelist -----------------------------------------------------------------------

    @admin.display(description=_("duration"))
    def duration_display(self, run: PipelineRun) -> str:
        return fmt_duration(run.duration)

    @admin.display(description=_("progress"))
    def progress_link(self, run: PipelineRun) -> str:
        return format_html('<a href="{}">{}</a>', self._url("progress_run", run.pk), _("watch"))

    @admin.action(description=_("Cancel the selected runs in flight"), permissions=["cancel_run"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        cancelled = [
            run.pk
            for run in queryset.filter(state__in=IN_FLIGHT)
            if _services().cancel(run_id=run.pk) is not None
        ]
        if not cancelled:
            self.message_user(
                request, gettext("None of the selected runs was in flight."), messages.WARNING
            )
            return
        self.message_user(
            request,
            ngettext(
                "%(count)d run cancelled; its running phase stops at its next heartbeat.",
                "%(count)d runs cancelled; their running phases stop at their next heartbeat.",
                len(cancelled),
            )
            % {"count": len(cancelled)},
            messages.SUCCESS,
        )

    # -- URLs -----------------------------------------------------------------------------

    def _url(self, name: str, *args: Any) -> str:
        info = self.opts.app_label, self.opts.model_name
        return reverse(
            f"{self.admin_site.name}:{info[0]}_{info[1]}_{name}",
            args=args,
            current_app=self.admin_site.name,
        )

    def get_urls(self) -> list[URLPattern]:
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        urls = [
            path("progress/", wrap(self.progress_list_view), name=f"{prefix}_progress"),
            path("progress/run-again/", wrap(self.run_again_view), name=f"{prefix}_run_again"),
            path(
                "progress/<int:run_id>/",
                wrap(self.progress_run_view),
                name=f"{prefix}_progress_run",
            ),
            path(
                "progress/<int:run_id>/resume/",
                wrap(self.resume_view),
                name=f"{prefix}_resume",
            ),
            path(
                "progress/<int:run_id>/cancel/",
                wrap(self.cancel_view),
                name=f"{prefix}_cancel",
            ),
        ]
        # Before the defaults: their "<path:object_id>/" would take "progress/" too.
        return urls + super().get_urls()

    # -- pages ----------------------------------------------------------------------------

    def _context(self, request: HttpRequest, **extra: Any) -> dict[str, Any]:
        return {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "can_start": self.has_start_run_permission(request),
            "can_cancel": self.has_cancel_run_permission(request),
            "run_again_url": self._url("run_again"),
            "progress_url": self._url("progress"),
            "labels": _labels(),
            **extra,
        }

    def progress_list_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        runs = PipelineRun.objects.latest_first().prefetch_related(
            Prefetch("phases", queryset=PhaseRun.objects.order_by("position"))
        )
        page = Paginator(runs, 25).get_page(request.GET.get("p"))
        rows = []
        for run in page:
            report = run_report(run, list(run.phases.all()), estimate=False)
            rows.append(
                {
                    "run": run,
                    "url": self._url("progress_run", run.pk),
                    "progress": report.progress,
                    "done": report.done_count,
                    "total": len(report.phases),
                    "duration": fmt_duration(report.duration),
                    "failed": report.state == RunState.FAILED,
                    "status_url": _status_url(run.pk) if report.in_flight else None,
                }
            )
        active = Generation.objects.filter(is_active=True).values_list("pk", flat=True).first()
        context = self._context(
            request,
            title=gettext("Live progress"),
            rows=rows,
            page=page,
            web=web_reports(),
            active_generation=active,
            in_flight=PipelineRun.objects.in_flight().exists(),
            details=can_see_details(request.user),
        )
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/initpipeline/progress_list.html", context)

    def progress_run_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        run = get_object_or_404(PipelineRun, pk=run_id)
        report = run_report(run)
        previous = history.previous_run(run)
        estimate = report.estimate_remaining
        context = self._context(
            request,
            title=gettext("Run %(id)s") % {"id": run.pk},
            run=run,
            run_data=report.as_dict(),
            phases=[
                {
                    "phase": p,
                    "duration": fmt_duration(p.duration),
                    "attempt": _attempt_text(p),
                    "failed": p.state == PhaseState.FAILED,
                    "shard": p.shard_index is not None,
                }
                for p in report.lanes()
            ],
            progress=report.progress,
            duration=fmt_duration(report.duration),
            estimate=estimate,
            estimate_text=None if estimate is None else fmt_duration(estimate),
            previous=previous,
            previous_data={
                "id": previous.pk,
                "duration": previous.duration,
                "spans": [asdict(s) for s in history.spans(previous)],
            }
            if previous is not None
            else None,
            previous_url=self._url("progress_run", previous.pk) if previous else None,
            previous_took=fmt_duration(previous.duration) if previous else None,
            status_url=_status_url(run.pk),
            resume_url=self._url("resume", run.pk),
            cancel_url=self._url("cancel", run.pk),
            resumable=run.state in RESUMABLE,
            run_failed=run.state == RunState.FAILED,
        )
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/initpipeline/progress_run.html", context)

    # -- actions --------------------------------------------------------------------------

    def _post_only(self, request: HttpRequest) -> HttpResponse | None:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        return None

    def run_again_view(self, request: HttpRequest) -> HttpResponse:
        """Run every phase again, cached or not (``start_init --force``)."""
        if (refused := self._post_only(request)) is not None:
            return refused
        if not self.has_start_run_permission(request):
            raise PermissionDenied
        trigger = trigger_label(request.user, via="admin: run again")
        return self._start(request, force=True, trigger=trigger, back=self._url("progress"))

    def resume_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        """Start again after a failure: the phases that succeeded are cached by fingerprint."""
        if (refused := self._post_only(request)) is not None:
            return refused
        if not self.has_start_run_permission(request):
            raise PermissionDenied
        run = get_object_or_404(PipelineRun, pk=run_id)
        back = self._url("progress_run", run.pk)
        if run.state not in RESUMABLE:
            self.message_user(
                request,
                gettext("Run %(id)s is %(state)s: only a failed or cancelled run can be resumed.")
                % {"id": run.pk, "state": run.get_state_display()},
                messages.WARNING,
            )
            return HttpResponseRedirect(back)
        trigger = trigger_label(request.user, via=f"admin: resume run {run.pk}")
        return self._start(request, force=False, trigger=trigger, back=back)

    def _start(self, request: HttpRequest, *, force: bool, trigger: str, back: str) -> HttpResponse:
        try:
            services = _services()
            result = services.start(force=force, trigger=trigger)
        except (PipelineConfigError, EnqueueError) as exc:
            self.message_user(
                request,
                gettext("The pipeline did not start: %(reason)s") % {"reason": exc},
                messages.ERROR,
            )
            return HttpResponseRedirect(back)
        if result.outcome == services.UP_TO_DATE:
            generation = result.generation
            self.message_user(
                request,
                gettext("Nothing to run: generation %(id)s is active and up to date.")
                % {"id": generation.pk if generation else "?"},
                messages.INFO,
            )
            return HttpResponseRedirect(back)
        run = result.run
        assert run is not None
        if result.outcome == services.ATTACHED:
            self.message_user(
                request,
                gettext("Run %(id)s is already in flight: follow it here, or cancel it first.")
                % {"id": run.pk},
                messages.WARNING,
            )
        else:
            to_run = run.phases.exclude(state=PhaseState.CACHED).count()
            cached = run.phases.filter(state=PhaseState.CACHED).count()
            self.message_user(
                request,
                ngettext(
                    "Run %(id)s started: %(count)d phase to run.",
                    "Run %(id)s started: %(count)d phases to run.",
                    to_run,
                )
                % {"id": run.pk, "count": to_run}
                + (
                    " "
                    + ngettext("%(count)d phase is cached.", "%(count)d phases are cached.", cached)
                    % {"count": cached}
                    if cached
                    else ""
                ),
                messages.SUCCESS,
            )
        return HttpResponseRedirect(self._url("progress_run", run.pk))

    def cancel_view(self, request: HttpRequest, run_id: int) -> HttpResponse:
        """Cancel a run in flight; its running phase stops at its next heartbeat."""
        if (refused := self._post_only(request)) is not None:
            return refused
        if not self.has_cancel_run_permission(request):
            raise PermissionDenied
        run = get_object_or_404(PipelineRun, pk=run_id)
        if _services().cancel(run_id=run.pk) is None:
            run.refresh_from_db()
            self.message_user(
                request,
                gettext("Run %(id)s is %(state)s: there is nothing to cancel.")
                % {"id": run.pk, "state": run.get_state_display()},
                messages.WARNING,
            )
        else:
            self.message_user(
                request,
                gettext(
                    "Run %(id)s cancelled; its running phase stops at its next progress "
                    "report or heartbeat."
                )
                % {"id": run.pk},
                messages.SUCCESS,
            )
        return HttpResponseRedirect(self._url("progress_run", run.pk))


class DetailsRule:
    """The records' pages show the init's details (messages, errors, tracebacks, what
    failed to load): for the users ``can_see_details`` names, whatever the model's own view
    permission says (PipelineRunAdmin and /init/status.json follow the same rule)."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_see_details(request.user)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return can_see_details(request.user)


@admin.register(PhaseRun)
class PhaseRunAdmin(DetailsRule, ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["run", "name", "state", "attempt", "started_at", "finished_at"]
    list_filter = ["state", "name"]
    list_select_related = ["run"]
    readonly_fields = [f.name for f in PhaseRun._meta.fields]


@admin.register(Artifact)
class ArtifactAdmin(DetailsRule, ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "format", "size", "digest", "run", "created_at"]
    list_filter = ["name", "format"]
    search_fields = ["name", "digest", "fingerprint"]
    readonly_fields = [f.name for f in Artifact._meta.fields]


@admin.register(Generation)
class GenerationAdmin(DetailsRule, ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["id", "is_active", "run", "created_at", "activated_at"]
    readonly_fields = ["run", "fingerprints", "is_active", "created_at", "activated_at"]
    filter_horizontal = ["artifacts"]


@admin.register(WebProcess)
class WebProcessAdmin(DetailsRule, ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["host", "server", "pid", "state", "generation", "reported_at"]
    list_filter = ["host", "state"]
    readonly_fields = [f.name for f in WebProcess._meta.fields]
