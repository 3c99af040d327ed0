/* initpipeline's live progress pages: polls /init/status.json, updates the page in place,
   draws the timeline as inline SVG. Plain JavaScript, no framework, no reload. */
"use strict";
(function () {
    const IN_FLIGHT = ["pending", "running"];
    const DONE = ["succeeded", "cached"];
    const POLL_MS = 1000;
    const MAX_DELAY_MS = 10000;
    const SVG = "http://www.w3.org/2000/svg";

    function readJSON(id) {
        const el = document.getElementById(id);
        return el ? JSON.parse(el.textContent) : null;
    }

    function interpolate(text, values) {
        return text.replace(/%\((\w+)\)s/g, (_, key) => String(values[key]));
    }

    // "1/3", then the losses and hand-offs, which are not attempts (a worker vanished, or
    // handed the phase back as it shut down): the same words as the page's first render.
    function attemptText(p, labels) {
        let text = `${p.attempt}/${p.max_attempts}`;
        if (p.losses) {
            text += ` · ${interpolate(labels.lost_count, {n: p.losses, max: p.max_losses})}`;
        }
        if (p.handoffs) {
            text += ` · ${interpolate(labels.handoffs, {n: p.handoffs})}`;
        }
        return text;
    }

    // Every phase, each sharded one followed by its shards: one table row and one timeline
    // lane each (a shard's name is its record's, "phase#3").
    function lanes(run) {
        return run.phases.flatMap((p) => [p, ...(p.shards || [])]);
    }

    /* Same output as initpipeline.formatters.fmt_duration. */
    function fmtDuration(seconds) {
        if (seconds === null || seconds === undefined) {
            return "-";
        }
        if (seconds < 60) {
            return seconds.toFixed(1) + " s";
        }
        const total = Math.round(seconds);
        const minutes = Math.floor(total / 60);
        if (minutes < 60) {
            return minutes + "m" + String(total % 60).padStart(2, "0") + "s";
        }
        return Math.floor(minutes / 60) + "h" + String(minutes % 60).padStart(2, "0") + "m";
    }

    function fmtTick(seconds) {
        if (seconds < 60) {
            return seconds + " s";
        }
        if (seconds % 60 === 0 && seconds < 3600) {
            return seconds / 60 + " min";
        }
        return fmtDuration(seconds);
    }

    function setText(el, text) {
        if (el && el.textContent !== text) {
            el.textContent = text;
        }
    }

    function setBadge(el, state, labels) {
        if (!el) {
            return;
        }
        setText(el, labels.states[state] || state);
        el.className = "ip-badge ip-state-" + state;
    }

    function setBar(bar, fraction, failed) {
        if (!bar) {
            return;
        }
        const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
        bar.setAttribute("aria-valuenow", String(percent));
        bar.firstElementChild.style.width = percent + "%";
        bar.classList.toggle("ip-bar-failed", Boolean(failed));
    }

    function overall(phases) {
        if (!phases.length) {
            return 0;
        }
        return phases.reduce((sum, p) => sum + p.progress, 0) / phases.length;
    }

    /* The server's clock, from the durations it computed at the time of the answer:
       the browser's clock may be off. */
    function serverNow(run) {
        let now = null;
        for (const p of run.phases) {
            if (p.started_at && p.duration !== null) {
                const end = Date.parse(p.started_at) + p.duration * 1000;
                now = now === null ? end : Math.max(now, end);
            }
        }
        return now;
    }

    function runDuration(run) {
        if (!run.started_at) {
            return null;
        }
        const start = Date.parse(run.started_at);
        const end = run.finished_at ? Date.parse(run.finished_at) : serverNow(run);
        return end === null ? null : Math.max(0, (end - start) / 1000);
    }

    /* Calls onData with each answer while it returns true; backs off when the server is away. */
    function poll(url, onData, onTrouble) {
        let delay = POLL_MS;
        async function tick() {
            let again = true;
            try {
                const response = await fetch(url, {
                    credentials: "same-origin",
                    cache: "no-store",
                    headers: {Accept: "application/json"},
                });
                if (response.status === 403 || response.status === 404) {
                    onTrouble("stopped", response.status + " " + response.statusText);
                    return;
                }
                if (!response.ok) {
                    throw new Error("HTTP " + response.status);
                }
                const data = await response.json();
                delay = POLL_MS;
                onTrouble(null);
                again = onData(data);
            } catch (error) {
                onTrouble("lost", String(error));
                delay = Math.min(delay * 2, MAX_DELAY_MS);
            }
            if (again) {
                window.setTimeout(tick, delay);
            }
        }
        window.setTimeout(tick, POLL_MS);
    }

    function troubleReporter(root, note, labels) {
        return function (kind, detail) {
            if (kind === null) {
                setText(note, "");
            } else if (kind === "lost") {
                setText(note, labels.lost);
            } else {
                root.dataset.live = "off";
                setText(note, interpolate(labels.stopped, {reason: detail}));
            }
        };
    }

    function clockFormatter(timeZone) {
        try {
            return new Intl.DateTimeFormat(undefined, {
                hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false, timeZone,
            });
        } catch (error) {
            return new Intl.DateTimeFormat(undefined, {
                hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
            });
        }
    }

    function niceStep(raw) {
        const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200];
        return steps.find((s) => s >= raw) || Math.ceil(raw / 3600) * 3600;
    }

    function svgEl(name, attrs, text) {
        const el = document.createElementNS(SVG, name);
        for (const [key, value] of Object.entries(attrs)) {
            el.setAttribute(key, String(value));
        }
        if (text !== undefined) {
            el.textContent = text;
        }
        return el;
    }

    /* One row per phase: this run's bar, and the previous successful run's below it. */
    function drawTimeline(container, run, previous, labels) {
        const width = 900;
        // Wide enough for the longest lane's name ("collect_docstrings#12"): about 7 px a
        // character at the chart's font size, within bounds.
        const longest = Math.max(0, ...lanes(run).map((p) => p.name.length));
        const labelWidth = Math.min(320, Math.max(120, 16 + longest * 7));
        const right = 20;
        const top = 6;
        const rowHeight = previous ? 30 : 22;
        const axisHeight = 22;
        const height = top + lanes(run).length * rowHeight + axisHeight;
        const origin = run.started_at ? Date.parse(run.started_at) : null;
        const now = serverNow(run);
        const current = lanes(run).map((p) => {
            const offset = origin !== null && p.started_at
                ? Math.max(0, (Date.parse(p.started_at) - origin) / 1000) : null;
            let duration = p.duration;
            if (duration === null && offset !== null && now !== null) {
                duration = Math.max(0, (now - Date.parse(p.started_at)) / 1000);
            }
            return {name: p.name, state: p.state, offset, duration};
        });
        const before = {};
        for (const span of previous ? previous.spans : []) {
            before[span.name] = span;
        }
        let extent = 1;
        for (const span of current.concat(previous ? previous.spans : [])) {
            if (span.offset !== null && span.duration !== null) {
                extent = Math.max(extent, span.offset + span.duration);
            }
        }
        const step = niceStep(extent / 6);
        const axisEnd = Math.ceil(extent / step) * step;
        const x = (t) => labelWidth + (t / axisEnd) * (width - labelWidth - right);

        const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, "aria-hidden": "true"});
        const axisY = top + lanes(run).length * rowHeight;
        for (let t = 0; t <= axisEnd + 1e-9; t += step) {
            svg.appendChild(svgEl("line", {class: "ip-tl-grid", x1: x(t), x2: x(t), y1: top, y2: axisY}));
            svg.appendChild(svgEl("text", {x: x(t), y: axisY + 15, "text-anchor": "middle"}, fmtTick(t)));
        }
        svg.appendChild(svgEl("line", {class: "ip-tl-axis", x1: labelWidth, x2: width - right, y1: axisY, y2: axisY}));

        current.forEach((span, i) => {
            const y = top + i * rowHeight;
            svg.appendChild(svgEl("text", {class: "ip-tl-name", x: labelWidth - 8, y: y + 12, "text-anchor": "end"}, span.name));
            if (span.offset !== null && span.duration !== null) {
                const bar = svgEl("rect", {
                    class: "ip-tl-bar ip-state-" + span.state,
                    "data-phase": span.name,
                    x: x(span.offset), y: y + 3, rx: 2, height: 11,
                    width: Math.max(2, x(span.offset + span.duration) - x(span.offset)),
                });
                bar.appendChild(svgEl("title", {}, `${span.name}: ${labels.states[span.state] || span.state}, ${fmtDuration(span.duration)}`));
                svg.appendChild(bar);
            } else if (span.state === "cached") {
                svg.appendChild(svgEl("text", {x: labelWidth + 4, y: y + 12}, labels.cached));
            }
            const old = before[span.name];
            if (previous && old && old.offset !== null && old.duration !== null) {
                const bar = svgEl("rect", {
                    class: "ip-tl-prev", "data-phase": span.name,
                    x: x(old.offset), y: y + 17, rx: 2, height: 6,
                    width: Math.max(2, x(old.offset + old.duration) - x(old.offset)),
                });
                bar.appendChild(svgEl("title", {}, `${span.name}: ${labels.previousRun}, ${fmtDuration(old.duration)}`));
                svg.appendChild(bar);
            }
        });
        container.replaceChildren(svg);
    }

    function splitError(text) {
        /* PhaseReport.as_dict joins the error and its traceback with a blank line. */
        if (!text) {
            return ["", ""];
        }
        const at = text.indexOf("\n\nTraceback (most recent call last):");
        return at < 0 ? [text, ""] : [text.slice(0, at), text.slice(at + 2)];
    }

    function updatePhase(table, p, labels, clock) {
        const row = table.querySelector(`tr[data-phase="${CSS.escape(p.name)}"]`);
        if (!row) {
            return;
        }
        setBadge(row.querySelector('[data-field="state"]'), p.state, labels);
        setBar(row.querySelector('[role="progressbar"]'), p.progress, p.state === "failed");
        setText(row.querySelector('[data-field="message"]'), p.message);
        setText(row.querySelector('[data-field="attempt"]'), attemptText(p, labels));
        setText(row.querySelector('[data-field="duration"]'), fmtDuration(p.duration));
        const started = row.querySelector('[data-field="started"]');
        const shown = started.querySelector("time");
        if (!p.started_at) {
            setText(started, "-");
        } else if (!shown || shown.getAttribute("datetime") !== p.started_at) {
            const time = document.createElement("time");
            time.setAttribute("datetime", p.started_at);
            time.textContent = clock.format(new Date(p.started_at));
            started.replaceChildren(time);
        }
        const errorRow = table.querySelector(`tr[data-error-for="${CSS.escape(p.name)}"]`);
        if (errorRow) {
            const [error, traceback] = splitError(p.error);
            errorRow.hidden = !error;
            setText(errorRow.querySelector('[data-field="error"]'), error);
            errorRow.querySelector('[data-field="traceback-box"]').hidden = !traceback;
            setText(errorRow.querySelector('[data-field="traceback"]'), traceback);
        }
    }

    function runPage(root, box, labels) {
        const clock = clockFormatter(root.dataset.timeZone);
        const previous = readJSON("ip-previous");
        const chart = document.getElementById("ip-timeline");
        const table = document.getElementById("ip-phases");
        const note = root.querySelector('[data-field="live-note"]');
        const initial = readJSON("ip-run-data");

        function update(run) {
            box.dataset.state = run.state;
            const inFlight = IN_FLIGHT.includes(run.state);
            setBadge(box.querySelector('[data-field="run-state"]'), run.state, labels);
            setBar(document.getElementById("ip-overall"), overall(run.phases), run.state === "failed");
            setText(box.querySelector('[data-field="run-duration"]'), fmtDuration(runDuration(run)));
            let left = labels.leftNone;
            if (inFlight) {
                left = run.estimate_remaining === null
                    ? labels.leftUnknown
                    : interpolate(labels.left, {time: fmtDuration(run.estimate_remaining)});
            }
            setText(box.querySelector('[data-field="estimate"]'), left);
            const runError = box.querySelector('[data-field="run-error"]');
            runError.hidden = !run.error;
            setText(runError, run.error || "");
            for (const p of lanes(run)) {
                updatePhase(table, p, labels, clock);
            }
            for (const form of box.querySelectorAll("form[data-when]")) {
                const when = form.dataset.when;
                form.hidden = !(
                    (when === "in-flight" && inFlight)
                    || (when === "ended" && !inFlight)
                    || (when === "resumable" && ["failed", "cancelled"].includes(run.state))
                );
            }
            drawTimeline(chart, run, previous, labels);
            return inFlight;
        }

        // The page's own times in the admin's time zone, as the script will write them.
        for (const el of table.querySelectorAll("time[datetime]")) {
            setText(el, clock.format(new Date(el.getAttribute("datetime"))));
        }
        const inFlight = update(initial);
        const url = box.dataset.statusUrl;
        if (inFlight && url) {
            root.dataset.live = "on";
            poll(url, (data) => {
                if (!data.run || data.run.id !== initial.id) {
                    return false;
                }
                const again = update(data.run);
                if (!again) {
                    root.dataset.live = "off";
                }
                return again;
            }, troubleReporter(root, note, labels));
        }
    }

    function listPage(root, table, labels) {
        const note = root.querySelector('[data-field="live-note"]');
        const report = troubleReporter(root, note, labels);
        const rows = Array.from(table.querySelectorAll("tr[data-status-url]"));
        let live = rows.length;
        root.dataset.live = live ? "on" : "off";
        for (const row of rows) {
            poll(row.dataset.statusUrl, (data) => {
                const run = data.run;
                if (!run) {
                    return false;
                }
                setBadge(row.querySelector('[data-field="state"]'), run.state, labels);
                setBar(row.querySelector('[role="progressbar"]'), overall(run.phases), run.state === "failed");
                const done = run.phases.filter((p) => DONE.includes(p.state)).length;
                setText(row.querySelector('[data-field="done"]'), `${done}/${run.phases.length}`);
                setText(row.querySelector('[data-field="duration"]'), fmtDuration(runDuration(run)));
                const again = IN_FLIGHT.includes(run.state);
                if (!again) {
                    live -= 1;
                    root.dataset.live = live ? "on" : "off";
                    if (!live) {
                        // Nothing in flight any more: a new run may be started.
                        for (const form of root.querySelectorAll('[data-when="idle"]')) {
                            form.hidden = false;
                        }
                    }
                }
                return again;
            }, report);
        }
    }

    function main() {
        const root = document.getElementById("ip-root");
        const labels = readJSON("ip-labels");
        if (!root || !labels) {
            return;
        }
        const box = document.getElementById("ip-run");
        if (box) {
            runPage(root, box, labels);
            return;
        }
        const runs = document.getElementById("ip-runs");
        if (runs) {
            listPage(root, runs, labels);
        }
    }

    if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", main);
    } else {
        main();
    }
})();
