"""What jobs print for a person: short tables on stdout (small, driver-side data only)."""

from __future__ import annotations

import sys
from datetime import datetime

from rich.console import Console
from rich.table import Table

from microseg.core import progress
from microseg.ingest.canonical import REASONS
from microseg.ingest.files import IngestReport
from microseg.ingest.quarantine import ReasonCount

console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def print_ingest_report(report: IngestReport) -> None:
    console.print(
        f"[bold]ingest[/bold] source={report.source} run={report.run_id} "
        f"files read={len(report.files)} skipped (already ingested)={len(report.skipped_files)}"
    )
    if not report.files:
        console.print("nothing new to ingest")
        return
    counts = {
        "records": report.records,
        "events added": report.events_added,
        "already present": report.already_present,
        "quarantined": report.quarantined,
    }
    if report.suppressed:  # records of people `microseg forget` erased
        counts["of erased people (dropped)"] = report.suppressed
    table = Table(*counts)
    table.add_row(*[f"{n:,}" for n in counts.values()])
    console.print(table)
    if report.reasons:
        reasons = Table("quarantine reason", "records", "meaning")
        for reason, count in sorted(report.reasons.items(), key=lambda kv: -kv[1]):
            reasons.add_row(reason, f"{count:,}", REASONS.get(reason, ""))
        console.print(reasons)
    if report.seconds:
        console.print(
            f"{report.records:,} records in {report.seconds:.1f} s "
            f"({report.records / report.seconds:,.0f} records/s)"
        )


def print_generate_manifest(settings, manifest: dict) -> None:
    counts = manifest.get("counts", manifest)
    console.print(f"[bold]generate[/bold] wrote {settings.format} files to {settings.output}")
    table = Table("what", "count")
    for key, value in counts.items():
        if isinstance(value, int | float):
            table.add_row(str(key), f"{value:,}")
    console.print(table)


def print_status(root: str, tables: list[dict], reasons: list[ReasonCount]) -> None:
    console.print(f"[bold]lake[/bold] {root}")
    table = Table("table", "rows", "version", "last operation")
    for t in tables:
        if t["rows"] is None:
            table.add_row(t["table"], "-", "-", "not created yet")
        else:
            table.add_row(t["table"], f"{t['rows']:,}", str(t["version"]), t["operation"])
    console.print(table)
    if reasons:
        by_reason = Table("source", "quarantine reason", "records")
        for r in reasons:
            by_reason.add_row(r.source, r.reason, f"{r.records:,}")
        console.print(by_reason)


def print_sessionize_report(report) -> None:
    console.print(f"[bold]sessionize[/bold] run={report.run_id} mode={report.mode}")
    if report.mode == "nothing new":
        console.print(f"no events ingested since {report.watermark}")
        return
    table = Table(
        "new events",
        "user keys rebuilt",
        "sessions written",
        "sessions removed",
        "visits cut at max length",
        "identity conflicts",
        "identities changed",
    )
    table.add_row(
        f"{report.new_events:,}",
        f"{report.users_touched:,}",
        f"{report.sessions_written:,}",
        f"{report.sessions_removed:,}",
        f"{report.split_visits:,}",
        f"{report.identity_conflicts:,}",
        f"{report.identities_changed:,}",
    )
    console.print(table)


def print_features_report(spark, cfg, report, examples: int = 3) -> None:
    """The run's counts and a few example users (the most active ones) with their features."""
    from pyspark.sql import functions as F

    from microseg.core import lake

    console.print(
        f"[bold]features[/bold] as of {report.as_of} UTC: {report.users:,} users, "
        f"{report.features} features, run={report.run_id}"
    )
    features_df = lake.read_table(spark, cfg.lake.root, lake.USER_FEATURES).filter(
        F.col("run_id") == report.run_id
    )
    most_active = ["user_key"]
    if "events_lifetime" in features_df.columns:
        most_active = [F.desc("events_lifetime"), "user_key"]
    rows = features_df.orderBy(*most_active).limit(examples).collect()
    if not rows:
        return
    shown = [
        name
        for name in (
            "days_since_last_event",
            "orders_lifetime",
            "revenue_lifetime",
            "avg_order_value_lifetime",
            "sessions_30d",
            "bounce_rate_30d",
            "cart_abandonment_rate_lifetime",
            "max_views_one_product_unbought_7d",
            "top_category",
            "preferred_hour",
            "recency_score",
            "frequency_score",
            "monetary_score",
            "engagement_score",
        )
        if name in rows[0].asDict()
    ]
    table = Table("feature", *[str(r.user_key) for r in rows])
    for name in shown:
        values = [r[name] for r in rows]
        table.add_row(name, *[f"{v:.2f}" if isinstance(v, float) else str(v) for v in values])
    console.print(table)


def print_segment_validation(catalog) -> None:
    table = Table("segment", "parent", "exclusive", "min size", "version", "streaming")
    for segment in catalog.segments:
        capable, why = catalog.streaming_capable(segment.id)
        table.add_row(
            segment.id,
            segment.parent or "",
            f"{segment.exclusive_group} #{segment.priority}" if segment.exclusive_group else "",
            str(segment.min_size or ""),
            catalog.version(segment.id),
            "yes" if capable else f"no: {why}",
        )
    console.print(table)
    console.print(f"{catalog.path}: {len(catalog.segments)} segments, no problems")


def print_segments_report(report) -> None:
    console.print(
        f"[bold]segments[/bold] as of {report.as_of.isoformat()}Z run={report.run_id} "
        f"users={report.users:,}"
    )
    table = Table("segment", "status", "matched", "size", "entered", "exited", "stability")
    for s in report.segments:
        table.add_row(
            s.segment_id,
            s.status,
            f"{s.matched:,}",
            f"{s.size:,}",
            f"{s.entered:,}",
            f"{s.exited:,}",
            "" if s.stability is None else f"{s.stability:.0%}",
        )
    console.print(table)
    for s in report.segments:
        if s.status_reason:
            console.print(f"{s.segment_id}: {s.status_reason}")


def print_segment(spark, cfg, catalog, segment_id: str) -> None:
    import json

    from microseg.segments.catalog import catalog_history

    segment = catalog[segment_id]
    capable, why = catalog.streaming_capable(segment_id)
    console.print(
        f"[bold]{segment.id}[/bold]: {segment.name} (version {catalog.version(segment_id)})"
    )
    if segment.description:
        console.print(segment.description)
    console.print(
        f"defined at {catalog.path} line {segment.line}; streaming-capable: "
        f"{'yes' if capable else 'no, ' + why}"
    )
    console.print(json.dumps(segment.definition, indent=2, sort_keys=True))
    history = catalog_history(spark, cfg.lake.root, segment_id)
    if history is None:
        console.print("no runs yet")
        return
    table = Table("as of", "version", "status", "matched", "size", "entered", "exited")
    for r in history.limit(20).collect():
        table.add_row(
            r.as_of.isoformat(),
            r.definition_version,
            r.status,
            f"{r.matched:,}",
            f"{r.size:,}",
            f"{r.entered:,}",
            f"{r.exited:,}",
        )
    console.print(table)


def print_runs(rows) -> None:
    if not rows:
        console.print("no runs recorded yet (ops/runs)")
        return
    table = Table("started (UTC)", "job", "as of", "status", "seconds", "rows written", "error")
    for r in rows:
        seconds = (r.ended_at - r.started_at).total_seconds()
        written = ", ".join(f"{k} {v:,}" for k, v in sorted((r.rows_written or {}).items()))
        table.add_row(
            r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.job,
            r.as_of.isoformat() if r.as_of else "",
            r.status,
            f"{seconds:.1f}",
            written,
            r.error or "",
        )
    console.print(table)


class PipelineProgress:
    """Passes each pipeline stage to the progress display as it starts, prints it when it
    ends, then a summary table."""

    def __init__(self) -> None:
        self.results: list = []
        self.started = 0.0

    def __enter__(self) -> PipelineProgress:
        import time

        self.started = time.monotonic()
        return self

    def __call__(self, event) -> None:
        if isinstance(event, str):
            progress.stage(event)
            return
        self.results.append(event)
        rows = "" if event.rows is None else f", {event.rows:,} rows"
        console.print(
            f"   {event.stage}: {event.status}{rows}, {event.seconds:.1f} s; {event.detail}"
        )

    def __exit__(self, *exc_info) -> None:
        import time

        table = Table("stage", "status", "rows", "seconds", "detail", title="pipeline")
        for r in self.results:
            table.add_row(
                r.stage,
                r.status,
                "" if r.rows is None else f"{r.rows:,}",
                f"{r.seconds:.1f}",
                r.detail,
            )
        console.print(table)
        outcome = "failed" if exc_info[0] else "finished"
        console.print(f"pipeline {outcome} in {time.monotonic() - self.started:.1f} s")


def print_cluster_train(report) -> None:
    console.print(
        f"[bold]cluster train[/bold] model={report.model_name} version={report.version} "
        f"as of {report.as_of.isoformat()}Z users={report.users:,} "
        f"(population: {report.population}; {report.training_seconds:.1f} s)"
    )
    metric = report.silhouette_metric.replace("_", " ")
    scores = Table(
        "k", f"silhouette ({metric})", "WCSS", title=f"k search on {report.sample_rows:,} users"
    )
    for s in report.scores:
        mark = " <" if s.k == report.k else ""
        silhouette = "" if s.silhouette is None else f"{s.silhouette:.4f}"
        scores.add_row(f"{s.k}{mark}", silhouette, f"{s.wcss:,.1f}")
    console.print(scores)
    profiles = Table("cluster", "name", "size", "share", "sets it apart (z of the mean)")
    for p in report.profiles:
        apart = ", ".join(f"{d['feature']} {d['z']:+.1f}" for d in p.get("top_features", []))
        profiles.add_row(
            p.get("stable_id", ""),
            p.get("name", ""),
            f"{p.get('size', 0):,}",
            f"{p.get('share', 0):.1%}",
            apart,
        )
    console.print(profiles)
    if report.ari is not None:
        console.print(
            f"adjusted Rand index vs generator personas: {report.ari:.3f} "
            f"({report.ari_users:,} users)"
        )


def print_cluster_assign(report) -> None:
    console.print(
        f"[bold]cluster assign[/bold] model={report.model_name} version={report.version} "
        f"as of {report.as_of.isoformat()}Z users={report.users:,}"
    )
    table = Table("segment", "name", "size", "entered", "exited", "stability")
    for c in report.clusters:
        table.add_row(
            c.segment_id,
            c.name,
            f"{c.size:,}",
            f"{c.entered:,}",
            f"{c.exited:,}",
            "" if c.stability is None else f"{c.stability:.0%}",
        )
    console.print(table)


def print_stream_changes(batch_id: int, counts: dict[tuple[str, str], int]) -> None:
    """One line per micro-batch with segment changes: +entered / -exited per segment."""
    by_segment: dict[str, dict[str, int]] = {}
    for (segment_id, change), n in counts.items():
        by_segment.setdefault(segment_id, {})[change] = n
    parts = [
        f"{segment_id} +{c.get('enter', 0)} -{c.get('exit', 0)}"
        for segment_id, c in sorted(by_segment.items())
    ]
    now = datetime.now().strftime("%H:%M:%S")
    console.print(f"{now} [bold]stream[/bold] batch {batch_id}: " + ", ".join(parts))


def print_stream_report(report) -> None:
    console.print(
        f"[bold]stream[/bold] query {report.query_id}: {report.batches} micro-batches, "
        f"{report.input_rows} events read, {report.points} evaluation points, "
        f"{report.changes} segment changes, {report.late_events} late events (beyond the "
        "watermark: in bronze, left to the next batch run)"
    )
    console.print("segments kept by the stream: " + ", ".join(report.segments))
    if report.kafka is not None:
        k = report.kafka
        console.print(
            f"kafka ingest: {k.batches} micro-batches, {k.records} records, "
            f"{k.events_added} events added to bronze/events, {k.quarantined} quarantined, "
            f"{k.already_present} already present"
        )


def print_register_report(report) -> None:
    table = Table("table", "location", title="registered (external Delta tables)")
    for name, location in report.registered:
        table.add_row(name, location)
    console.print(table)
    if report.views:
        console.print("views: " + ", ".join(report.views))
    if report.missing:
        missing = ", ".join(report.missing)
        console.print(f"not written yet (run the jobs, then register again): {missing}")


def print_erasure(report, verification=None) -> None:
    subjects = report.subjects
    missing = [i for i in subjects.given if i not in subjects.found]
    console.print(
        f"[bold]forget[/bold] request={report.request_id}: {len(subjects.given)} id(s) given, "
        f"{len(subjects.user_ids)} user id(s) and {len(subjects.anonymous_ids)} anonymous "
        f"id(s) found" + (f"; no data for {', '.join(missing)}" if missing else "")
    )
    table = Table("table", "rows removed")
    for name, rows in report.rows_removed.items():
        table.add_row(name, f"{rows:,}")
    table.add_row("online store (entries)", f"{report.store_entries_removed:,}")
    for destination_id, people in report.destinations_notified.items():
        table.add_row(f"destination {destination_id} (removals sent)", f"{people:,}")
    console.print(table)
    for path in report.checkpoints_removed:
        console.print(
            f"stream checkpoint {path} deleted: the next `microseg stream` rebuilds its state "
            "from the erased lake"
        )
    if report.purged:
        console.print(
            f"deletion vectors purged (REORG ... APPLY (PURGE)): {', '.join(report.purged)}"
        )
    hours = report.retention.total_seconds() / 3600
    console.print(
        f"VACUUM (retention {hours:g} h) deleted {report.vacuumed_files:,} file(s); "
        + (
            "no file of the lake holds the removed rows any more"
            if hours == 0
            else f"files the erasure replaced go at the first forget or maintain after "
            f"{report.completed_at + report.retention:%Y-%m-%d %H:%M} UTC"
        )
    )
    if verification is None:
        return
    if verification.clean:
        console.print(
            f"[bold green]verified[/bold green]: {verification.files:,} files "
            f"({verification.bytes / 1e6:,.1f} MB) read, no id of these people in any of them"
        )
        return
    console.print(
        f"[bold red]not verified[/bold red]: {verification.files:,} files read, "
        f"{len(verification.hits)} hit(s), {len(verification.unreadable)} file(s) not readable"
    )
    hits = Table("file", "where", "id")
    for hit in verification.hits[:50]:
        hits.add_row(hit.path, hit.where, hit.value)
    for path, why in verification.unreadable[:50]:
        hits.add_row(path, f"not checked: {why}", "")
    console.print(hits)


def print_maintain_report(report, cfg) -> None:
    retention = cfg.privacy.erasure_retention.total_seconds() / 3600
    console.print(
        f"[bold]maintain[/bold] {cfg.lake.root}: VACUUM retention {retention:g} h, log "
        f"retention {cfg.maintain.log_retention.days} days, "
        + (
            f"rows older than {report.cutoff:%Y-%m-%d %H:%M} UTC deleted"
            if report.cutoff
            else "no retention policy (maintain.retention)"
        )
    )
    table = Table("table", "rows expired", "files compacted", "files vacuumed", "problem")
    for t in report.tables:
        table.add_row(
            t.table,
            f"{t.rows_expired:,}",
            f"{t.files_compacted:,}",
            f"{t.files_vacuumed:,}",
            t.problem or "",
        )
    console.print(table)


def print_experiment_assign(report) -> None:
    console.print(
        f"[bold]experiment assign[/bold] as of {report.as_of:%Y-%m-%d %H:%M} run={report.run_id}"
    )
    if not report.total:
        console.print("no assignments: no experiment is active, or its segment has no members")
    table = Table("experiment", "variant", "assigned now", "assigned in all")
    for experiment_id in sorted(report.total):
        for variant, total in sorted(report.total[experiment_id].items()):
            added = report.added.get(experiment_id, {}).get(variant, 0)
            table.add_row(experiment_id, variant, f"{added:,}", f"{total:,}")
    if report.total:
        console.print(table)
    if report.inactive:
        console.print(f"not active at this time: {', '.join(report.inactive)}")
    console.print(f"online store: {report.store_synced:,} assignments sent")


def _pct(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}" if value >= 0.0001 else f"{value:.1e}"


def print_experiment_results(report) -> None:
    console.print(
        f"[bold]experiment analyze[/bold] as of {report.as_of:%Y-%m-%d %H:%M} "
        f"run={report.run_id} new exposures={report.new_exposures:,}"
    )
    for result in report.results:
        e = result.experiment
        srm = "[red]MISMATCH[/red]" if result.srm_flag else "ok"
        console.print(
            f"\n[bold]{e.id}[/bold] (segment {e.segment}, {e.allocation}): sample ratio "
            f"{srm} (p={_p(result.srm_p_value)}), chi-square p={_p(result.chi2_p_value)}"
        )
        table = Table(
            "variant",
            "assigned",
            "exposed",
            "conversion",
            "lift (CI)",
            "p",
            "revenue/user",
            "CUPED diff (CI)",
            "CUPED p",
        )
        for v in result.variants:
            lift = (
                f"{_pct(v.z.lift, 1)} ({_pct(v.z.lift_ci[0], 1)}, {_pct(v.z.lift_ci[1], 1)})"
                if v.z
                else ("control" if v.is_control else "")
            )
            cu = v.cuped
            table.add_row(
                v.variant,
                f"{v.assigned:,}",
                f"{v.exposed:,}",
                _pct(v.conversion_rate),
                lift,
                _p(v.z.p_value) if v.z else "",
                "" if v.revenue_per_user is None else f"{v.revenue_per_user:,.2f}",
                f"{cu.test.diff:+,.2f} ({cu.test.ci[0]:,.2f}, {cu.test.ci[1]:,.2f})" if cu else "",
                _p(cu.test.p_value) if cu else "",
            )
        console.print(table)
        if result.allocation:
            weights = ", ".join(f"{k} {w:.3f}" for k, w in result.allocation.items())
            console.print(f"bandit allocation v{result.allocation_version}: {weights}")


def print_sample_size(baseline: float, mde: float, alpha: float, power: float, n: int) -> None:
    console.print(
        f"baseline {_pct(baseline)}, detect {_pct(mde, 1)} relative change "
        f"(alpha {alpha}, power {power}): [bold]{n:,}[/bold] exposed users per variant"
    )


def print_activate_report(report) -> None:
    console.print(f"[bold]activate[/bold] run={report.run_id}")
    if not report.destinations:
        console.print("no segment changes yet: run `microseg segments run` first")
        return
    table = Table(
        "destination",
        "type",
        "new changes",
        "no consent (not sent)",
        "batches",
        "requests",
        "delivered",
        "failed",
    )
    for d in report.destinations:
        table.add_row(
            d.destination_id,
            d.kind,
            f"{d.planned:,}",
            f"{d.no_consent:,}",
            f"{d.batches_sent:,}",
            f"{d.attempts:,}",
            f"{d.delivered:,}",
            f"[red]{d.failed:,}[/red]" if d.failed else "0",
        )
    console.print(table)
    for d in report.destinations:
        if d.snapshot_rows is not None:
            console.print(f"{d.destination_id}: snapshot of {d.snapshot_rows:,} current members")
        for error in d.errors[:5]:
            console.print(f"[red]{d.destination_id}[/red] {error} (sent again by the next run)")


def print_trigger_report(report) -> None:
    console.print(
        f"[bold]triggers[/bold] as of {report.as_of:%Y-%m-%d %H:%M:%S} run={report.run_id} "
        f"({report.seconds:.1f} s)"
    )
    table = Table("trigger", "name", "fired", "conditions not met", "not in segment", "capped")
    for t in report.triggers:
        table.add_row(
            t.trigger_id,
            t.name,
            f"{t.fired:,}",
            *(
                f"{t.suppressed.get(r, 0):,}"
                for r in ("conditions_not_met", "not_in_segment", "capped")
            ),
        )
    console.print(table)
    console.print("decisions are in gold/trigger_firings; a rerun at the same as-of adds none")


def print_health_report(report) -> None:
    console.print(
        f"[bold]health[/bold] as of {report.as_of:%Y-%m-%d %H:%M:%S} run={report.run_id}: "
        f"{report.segments} segments, {len(report.alerts)} alerts"
    )
    from microseg.segments.health import KPI_LABELS, kpi_text

    kpis = Table(
        "segment", *(label for _, label, _ in KPI_LABELS), title="KPIs (gold/segment_kpis)"
    )
    for k in sorted(report.kpis, key=lambda k: (k["segment_id"] != "all_users", k["segment_id"])):
        kpis.add_row(k["segment_id"], *(kpi_text(k[c], kind) for c, _, kind in KPI_LABELS))
    console.print(kpis)
    if report.alerts:
        alerts = Table("segment", "alert", "what", title="alerts (gold/segment_alerts)")
        for a in sorted(report.alerts, key=lambda a: (a["segment_id"], a["alert"])):
            alerts.add_row(a["segment_id"], a["alert"], a["message"])
        console.print(alerts)
    else:
        console.print("no alerts")


def print_activation_stream_report(report) -> None:
    clock = "none" if report.clock is None else f"{report.clock:%Y-%m-%d %H:%M:%S}"
    console.print(
        f"[bold]activate --stream[/bold] micro-batches that moved the clock: {report.batches}, "
        f"clock {clock}, firings {report.fired:,}, changes delivered {report.delivered:,}, "
        f"not sent for want of marketing consent {report.no_consent:,}"
        + (f", [red]failed {report.failed:,}[/red]" if report.failed else "")
    )


def print_segment_preview(report) -> None:
    console.print(
        f"[bold]segments preview[/bold] {report.path} as of {report.as_of:%Y-%m-%d %H:%M:%S} "
        f"({report.users:,} users; nothing published)"
    )
    table = Table("segment", "status", "matched", "size", "now", "kept", "new")
    for s in report.segments:
        now = "-" if s.published is None else f"{s.published:,}"
        table.add_row(
            s.segment_id,
            s.status,
            f"{s.matched:,}",
            f"{s.size:,}",
            now,
            f"{s.kept:,}",
            f"{s.size - s.kept:,}",
        )
    console.print(table)
    console.print(
        "now: current members of the same id (any source); kept: of the preview's members, "
        "those already in it; new: the others"
    )
    for s in report.segments:
        shared = ", ".join(f"{o} ({n:,})" for o, n in s.overlaps) or "no current segment"
        line = f"{s.segment_id}: shares most with {shared}"
        if s.sample:
            line += f"; members such as {', '.join(s.sample)}"
        console.print(line + (f"; {s.status_reason}" if s.status_reason else ""))
