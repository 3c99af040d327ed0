"""One OpenTelemetry trace per run: start_init's span is its root, each phase and each shard
a child span, in whichever process and on whichever host runs it.

Off unless the project configured a tracer provider (``trace.set_tracer_provider``, or
``opentelemetry-instrument``): without one, every function here returns at once, and
OpenTelemetry is not even imported (a project that configured one has imported it).
Needs the ``otel`` extra (``opentelemetry-api``); the SDK and an exporter are the
project's choice.

How the spans find each other across Celery tasks: the root span's context is kept in the
run's record (``PipelineRun.options["trace"]``, W3C ``traceparent``), so a phase span is
its child whichever worker runs it, after a loss, a hand-off or recovery's resend, with or
without ``opentelemetry-instrumentation-celery``. With it, the task's own ``run/<task>``
span is current when the phase starts: when it belongs to the run's trace (the message was
sent from inside it), the phase span nests under it, keeping Celery's
``apply_async``/``run`` spans in the picture; when it does not (recovery sent the message
from a thread with no span), the phase span is the root's child and links to it.

Losses, hand-offs, retries and resumes are span events (``initpipeline.lost``, ...): on the
phase's span when the process that records them runs it, else on a short span of their own
in the run's trace (recovery finds a loss in another process than the lost one).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from .models import PhaseRun, PipelineRun

logger = logging.getLogger("initpipeline")

T = TypeVar("T")

#: The key of the run's trace context in PipelineRun.options.
OPTION = "trace"

LOST = "initpipeline.lost"
HANDED_OFF = "initpipeline.handed_off"
RETRY = "initpipeline.retry"
RESUMED = "initpipeline.resumed"


def tracer() -> Tracer | None:
    """The tracer of the project's provider, or None when tracing is off."""
    if "opentelemetry.trace" not in sys.modules:
        return None  # Nothing configured a provider: it would have imported this.
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    from . import __version__

    return provider.get_tracer("initpipeline", __version__)


def _carrier(span: Span) -> dict[str, str]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    # W3C traceparent whatever propagator the project set globally (B3, Jaeger...): it is
    # read back by this module only.
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def run_context(options: Any) -> Context | None:
    """The context of the run's root span, from its record's options (None: not traced)."""
    carrier = options.get(OPTION) if isinstance(options, dict) else None
    if not isinstance(carrier, dict) or "traceparent" not in carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


# -- the root: start_init ----------------------------------------------------------------------


class RunTrace:
    """The root span of a run, opened by services.start() once it creates the run.

    It starts when start() was called (planning is part of the deploy), but only a start
    that creates a run makes a trace: an "up to date" or an attached start_init makes none.
    """

    def __init__(self) -> None:
        self.began = time.time_ns()
        self.span: Span | None = None

    def begin(self, *, trigger: str, options: dict[str, Any]) -> None:
        """Open the root span; its context goes into ``options`` (the run's record)."""
        found = tracer()
        if found is None:
            return
        self.span = found.start_span(
            "start_init",
            start_time=self.began,
            attributes={"initpipeline.run.trigger": trigger or "", **_options(options)},
        )
        options[OPTION] = _carrier(self.span)

    def created(self, run: PipelineRun, to_run: list[str]) -> None:
        if self.span is not None:
            self.span.set_attribute("initpipeline.run.id", run.pk)
            self.span.set_attribute("initpipeline.run.phases_to_run", len(to_run))

    def within(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn`` with the root span current (Celery's instrumentation then makes its
        ``apply_async`` spans the root's children)."""
        if self.span is None:
            return fn(*args)
        from opentelemetry import trace

        with trace.use_span(self.span, end_on_exit=False):
            return fn(*args)

    def end(self, error: BaseException | None = None) -> None:
        if self.span is None:
            return
        if error is not None:
            _failed(self.span, error)
        self.span.end()
        self.span = None


def _options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "initpipeline.run.force": bool(options.get("force")),
        "initpipeline.run.from": str(options.get("from") or ""),
        "initpipeline.run.only": [str(n) for n in options.get("only") or []],
    }


def _failed(span: Span, error: BaseException | str) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, BaseException):
        span.record_exception(error)
        description = f"{type(error).__name__}: {error}"
    else:
        description = error
    span.set_status(Status(StatusCode.ERROR, description[:500]))


# -- a phase or a shard: claimed by a copy of its task, ended with the task ------------------


@dataclass
class _Open:
    span: Span
    token: object
    phase_run_id: int | None


#: The spans this process has open, by Celery task id (tasks.py's run_phase, finish_run).
_open: dict[str, _Open] = {}
_lock = threading.Lock()


def _phase_attributes(pr: PhaseRun, worker: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "initpipeline.run.id": pr.run_id,
        "initpipeline.phase.name": pr.shard_of or pr.name,
        "initpipeline.phase.attempt": pr.attempt,
        "initpipeline.phase.lease": pr.lease,
        "initpipeline.phase.losses": pr.losses,
        "initpipeline.phase.handoffs": pr.handoffs,
        "initpipeline.phase.fingerprint": pr.fingerprint,
        "initpipeline.phase.reason": pr.reason,
        "initpipeline.worker": worker,
    }
    if pr.shard_of:
        attributes["initpipeline.shard.index"] = pr.shard_index
        attributes["initpipeline.shard.count"] = pr.shard_count
    elif pr.shard_count is not None:
        attributes["initpipeline.shard.count"] = pr.shard_count
    return attributes


def _span_name(pr: PhaseRun) -> str:
    # Low cardinality, as OpenTelemetry asks: a shard's index is an attribute.
    return f"shard {pr.shard_of}" if pr.shard_of else f"phase {pr.name}"


def _start(name: str, root: Context | None, attributes: dict[str, Any]) -> Span | None:
    """A span in the run's trace: under the current span when that is in the run's trace
    already (Celery's ``run/<task>``), else under the run's root, linked to the current."""
    found = tracer()
    if found is None or root is None:
        return None
    from opentelemetry import trace

    current = trace.get_current_span().get_span_context()
    root_trace = trace.get_current_span(root).get_span_context().trace_id
    links = []
    parent: Context | None = root
    if current.is_valid:
        if current.trace_id == root_trace:
            parent = None  # The current context: Celery's span, itself in the run's trace.
        else:
            links = [trace.Link(current)]
    return found.start_span(name, context=parent, attributes=attributes, links=links)


def phase_claimed(pr: PhaseRun, *, task_id: str, worker: str, lost: str = "") -> None:
    """execution.claim(): this copy of the task owns the phase (``pr``, with its run): its
    span opens and becomes current until the task ends (``task_ended``). ``lost``: the
    claim took the phase over from a worker that vanished."""
    if tracer() is None or not task_id:
        return
    try:
        span = _start(_span_name(pr), run_context(pr.run.options), _phase_attributes(pr, worker))
        if span is None:
            return
        if lost:
            span.add_event(LOST, {"initpipeline.reason": lost, "initpipeline.losses": pr.losses})
        point = pr.checkpoint or {}
        if point:
            span.add_event(
                RESUMED,
                {
                    "initpipeline.checkpoint.done": float(point.get("done") or 0),
                    "initpipeline.checkpoint.total": float(point.get("total") or 0),
                },
            )
        from opentelemetry import context, trace

        token = context.attach(trace.set_span_in_context(span))
        with _lock:
            _open[task_id] = _Open(span, token, pr.pk)
    except Exception:
        # A trace is worth losing, a phase is not.
        logger.warning("could not open the span of phase %s", pr.name, exc_info=True)


def finish_started(run_id: int, task_id: str) -> None:
    """The run's finish step (tasks.finish_run) starts: its span opens (one query)."""
    if tracer() is None or not task_id:
        return
    from .models import PipelineRun

    try:
        options = PipelineRun.objects.filter(pk=run_id).values_list("options", flat=True).first()
        span = _start("finish_run", run_context(options), {"initpipeline.run.id": run_id})
        if span is None:
            return
        from opentelemetry import context, trace

        token = context.attach(trace.set_span_in_context(span))
        with _lock:
            _open[task_id] = _Open(span, token, None)
    except Exception:
        logger.warning("could not open the span of run %s's finish step", run_id, exc_info=True)


def task_ended(task_id: str, *, state: str, retval: Any) -> None:
    """Celery's task_postrun (signals.py): the task's span ends with its outcome.

    ``state`` is Celery's: SUCCESS (the phase's state, or the generation activated, is
    ``retval``), RETRY (a failed attempt; its retry event is on the span), FAILURE (the
    phase failed for good), IGNORED (cancelled, handed off, or a copy that had to skip).
    """
    with _lock:
        found = _open.pop(task_id, None)
    if found is None:
        return
    try:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span = found.span
        span.set_attribute("initpipeline.task.state", state)
        if state == "SUCCESS":
            if found.phase_run_id is None:
                span.set_attribute("initpipeline.generation.id", retval or 0)
            else:
                span.set_attribute("initpipeline.phase.outcome", str(retval))
            span.set_status(Status(StatusCode.OK))
        elif state == "FAILURE":
            _failed(span, retval if isinstance(retval, BaseException) else str(retval))
        context.detach(found.token)  # type: ignore[arg-type]
        span.end()
    except Exception:
        logger.warning("could not end the span of task %s", task_id, exc_info=True)


# -- events -------------------------------------------------------------------------------------


def event(pr: PhaseRun, name: str, *, error: str = "", **attributes: Any) -> None:
    """Record what happened to phase run ``pr`` (a loss, a hand-off, a retry) in its trace.

    On the span of the copy running it in this process; else (recovery found the loss, a
    worker took a phase back from its pool process) on a short span of its own, named
    after it, under the run's root. ``error``: the attempt failed with it (the span's
    status says so).
    """
    if tracer() is None:
        return
    try:
        values = {f"initpipeline.{k}": v for k, v in attributes.items()}
        with _lock:
            mine = next((o for o in _open.values() if o.phase_run_id == pr.pk), None)
        if mine is not None:
            mine.span.add_event(name, values)
            if error:
                _failed(mine.span, error)
            return
        from .models import PipelineRun

        options = PipelineRun.objects.filter(pk=pr.run_id).values_list("options", flat=True).first()
        short = name.removeprefix("initpipeline.").replace("_", " ")
        span = _start(
            f"{short} {pr.shard_of or pr.name}",
            run_context(options),
            _phase_attributes(pr, pr.worker),
        )
        if span is None:
            return
        span.add_event(name, values)
        if error:
            _failed(span, error)
        span.end()
    except Exception:
        logger.warning("could not record %s of phase %s in its trace", name, pr.name, exc_info=True)
