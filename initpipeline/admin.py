"""Read-only admin for the run records (history is never edited by hand)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from .models import Artifact, Generation, PhaseRun, PipelineRun


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
    fields = ("position", "name", "state", "attempt", "message", "started_at", "finished_at")
    readonly_fields = fields
    ordering = ["position"]


@admin.register(PipelineRun)
class PipelineRunAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["id", "state", "created_at", "started_at", "finished_at", "trigger"]
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


@admin.register(PhaseRun)
class PhaseRunAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["run", "name", "state", "attempt", "started_at", "finished_at"]
    list_filter = ["state", "name"]
    list_select_related = ["run"]
    readonly_fields = [f.name for f in PhaseRun._meta.fields]


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["name", "format", "size", "sha256", "run", "created_at"]
    list_filter = ["name", "format"]
    search_fields = ["name", "sha256", "fingerprint"]
    readonly_fields = [f.name for f in Artifact._meta.fields]


@admin.register(Generation)
class GenerationAdmin(ReadOnlyMixin, admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ["id", "is_active", "run", "created_at", "activated_at"]
    readonly_fields = ["run", "fingerprints", "is_active", "created_at", "activated_at"]
    filter_horizontal = ["artifacts"]
