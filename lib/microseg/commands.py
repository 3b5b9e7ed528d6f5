"""The commands of `microseg`: per command, its arguments and what it runs (one library call,
then the console report). microseg.cli builds the parser from COMMANDS and runs one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from microseg.core.config import Config, ConfigError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Config, argparse.Namespace], int | None]
    progress: bool = True  # show the stage, step and elapsed time while it runs


def _spark(
    cfg: Config,
    args: argparse.Namespace,
    job: str,
    then: str,
    *,
    kafka: bool = False,
    conf: dict[str, str] | None = None,
):
    """The session of command `job` (see microseg.core.spark.build_spark); `then`: the
    command's progress step once Spark runs (the jobs may say more)."""
    from microseg.core import progress
    from microseg.core.spark import build_spark

    progress.step("starting Spark")
    spark = build_spark(
        cfg.spark,
        app_name=f"{cfg.spark.app_name}-{job}",
        kafka=kafka,
        conf=conf,
        verbose=args.verbose,
    )
    progress.step(then)
    return spark


def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", required=True, help="source mapping name (conf/sources/NAME.yaml)"
    )
    parser.add_argument("--path", required=True, help="input file, folder (recursive) or glob")
    parser.add_argument(
        "--format", choices=("json", "csv", "parquet"), help="override the mapping's input format"
    )
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="read files again even if already ingested (adds nothing that is already there)",
    )


def _ingest(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.ingest.files import run_ingest
    from microseg.ops.forget import recorded_job
    from microseg.serving.console import print_ingest_report

    spark = _spark(cfg, args, "ingest", f"reading {args.path}")
    with recorded_job(spark, cfg, job="ingest") as run:
        report = run_ingest(
            spark,
            cfg,
            source=args.source,
            path=args.path,
            fmt=args.format,
            reprocess=args.reprocess,
            run_id=run.run_id,
        )
        run.read("input records", report.records)
    print_ingest_report(report)
    return 0


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--users", type=int, help="number of users (default generate.users)")
    size.add_argument("--events", type=int, help="about this many events (sets the user count)")
    parser.add_argument("--days", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--format", choices=("json", "parquet"))
    parser.add_argument("--output", help="output folder (default generate.output)")
    for fault in ("malformed", "duplicate", "late", "invalid"):
        parser.add_argument(f"--{fault}-share", type=float, dest=f"{fault}_share")


def _generate(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core import progress
    from microseg.core.config import GenerateConfig
    from microseg.ingest.generate import estimate_users_for_events, generate
    from microseg.serving.console import print_generate_manifest

    updates = {
        k: v for k, v in vars(args).items() if v is not None and k in GenerateConfig.model_fields
    }
    if args.events is not None:
        updates["users"] = estimate_users_for_events(args.events)
    try:
        settings = GenerateConfig.model_validate({**cfg.generate.model_dump(), **updates})
    except ValidationError as exc:
        raise ConfigError(
            f"generate: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}"
        ) from exc
    manifest = generate(settings, progress=progress.step)
    print_generate_manifest(settings, manifest)
    return 0


def _sessionize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full", action="store_true", help="rebuild all sessions instead of the incremental run"
    )


def _sessionize(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.ops.forget import recorded_job
    from microseg.serving.console import print_sessionize_report
    from microseg.silver.sessions import run_sessionize

    spark = _spark(cfg, args, "sessionize", "reading new events")
    with recorded_job(spark, cfg, job="sessionize") as run:
        report = run_sessionize(spark, cfg, full=args.full, run_id=run.run_id)
        run.read("bronze/events", report.new_events)
    print_sessionize_report(report)
    return 0


def _as_of(text: str):
    from datetime import datetime, timezone

    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not an ISO 8601 time such as 2026-10-01 or 2026-10-01T12:00:00Z"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _features_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as-of",
        required=True,
        type=_as_of,
        help="point in time (UTC unless an offset is given); only earlier events are used",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="recompute from every event before the as-of time instead of from silver's "
        "sessions and rollups (slower; the same result, kept as a check)",
    )


def _features(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.features.job import run_features
    from microseg.ops.forget import recorded_job
    from microseg.serving.console import print_features_report

    spark = _spark(cfg, args, "features", f"computing features as of {args.as_of:%Y-%m-%d %H:%M}")
    with recorded_job(spark, cfg, job="features", as_of=args.as_of) as run:
        result = run_features(
            spark, cfg, as_of=args.as_of, run_id=run.run_id, from_scratch=args.from_scratch
        )
    print_features_report(spark, cfg, result)
    return 0


def _segments_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("run", "validate", "show", "preview"),
        help="run: publish members as of --as-of; validate: check the segment file; "
        "show ID: a segment's definition, version and history; preview FILE: sizes, overlaps "
        "and sample members of a segment file at the newest snapshot (or --as-of), "
        "publishing nothing",
    )
    parser.add_argument(
        "segment_id", nargs="?", help="segment id (for show), segment file (for preview)"
    )
    parser.add_argument("--as-of", type=_as_of, help="point in time (run; preview)")
    parser.add_argument("--file", help="segment file (default: segments.file)")


def _segments(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.segments.model import SegmentFileError
    from microseg.segments.parse import load_segments
    from microseg.serving import console as report

    if args.action == "run" and args.as_of is None:
        raise ConfigError("segments run needs --as-of TIME")
    if args.action == "show" and not args.segment_id:
        raise ConfigError("segments show needs a segment id")
    if args.action == "preview":
        args.file = args.segment_id or args.file
    try:
        catalog = load_segments(cfg, args.file)
        if args.action == "validate":
            _check_sql_without_data(cfg, args, catalog)
            report.print_segment_validation(catalog)
            return 0
    except SegmentFileError as exc:
        for problem in exc.problems:
            print(f"microseg segments: {problem}", file=sys.stderr)
        return 2
    from microseg.segments.evaluate import run_segments

    spark = _spark(cfg, args, "segments", "reading features and segments")
    if args.action == "show":
        try:
            catalog[args.segment_id]
        except KeyError:
            raise ConfigError(
                f"no segment '{args.segment_id}' in {catalog.path} "
                f"(ids: {', '.join(catalog.ids())})"
            ) from None
        report.print_segment(spark, cfg, catalog, args.segment_id)
        return 0
    if args.action == "preview":
        from microseg.segments.preview import preview_segments

        report.print_segment_preview(preview_segments(spark, cfg, catalog.path, as_of=args.as_of))
        return 0
    from microseg.ops.forget import recorded_job

    with recorded_job(spark, cfg, job="segments run", as_of=args.as_of) as run:
        result = run_segments(spark, cfg, as_of=args.as_of, path=args.file, run_id=run.run_id)
    report.print_segments_report(result)
    return 0


def _check_sql_without_data(cfg: Config, args: argparse.Namespace, catalog) -> None:
    """sql conditions are checked by Spark's analyzer on an empty frame (no job runs)."""
    from microseg.segments.evaluate import check_sql, feature_frame_schema
    from microseg.segments.model import sql_conditions
    from microseg.segments.parse import available_features

    if not any(sql_conditions(s.condition) for s in catalog.segments):
        return
    spark = _spark(cfg, args, "segments-validate", "checking sql conditions")
    schema = feature_frame_schema(available_features(cfg))
    check_sql(catalog, spark.createDataFrame([], schema))


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=("train", "assign"), help="train a new model version, or assign users"
    )
    parser.add_argument("--as-of", required=True, type=_as_of, help="features snapshot time")
    parser.add_argument("--version", help="model version to assign with (default: latest)")
    parser.add_argument(
        "--ground-truth",
        metavar="USERS_CSV",
        help="users.csv of `microseg generate`: report the adjusted Rand index vs personas",
    )


ALGORITHM_LABELS = {
    "kmeans": "KMeans",
    "bisecting_kmeans": "BisectingKMeans",
    "gaussian_mixture": "GaussianMixture",
}


def _cluster(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.ml import clustering
    from microseg.ops.forget import recorded_job
    from microseg.serving.console import print_cluster_assign, print_cluster_train

    spark = _spark(
        cfg,
        args,
        f"cluster-{args.action}",
        f"training {ALGORITHM_LABELS[cfg.cluster.algorithm]}"
        if args.action == "train"
        else "assigning users to clusters",
    )
    with recorded_job(spark, cfg, job=f"cluster {args.action}", as_of=args.as_of) as run:
        if args.action == "train":
            result = clustering.train_clusters(
                spark, cfg, as_of=args.as_of, ground_truth=args.ground_truth, run_id=run.run_id
            )
        else:
            result = clustering.assign_clusters(
                spark, cfg, as_of=args.as_of, version=args.version, run_id=run.run_id
            )
    (print_cluster_train if args.action == "train" else print_cluster_assign)(result)
    return 0


def _propensity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=("train", "score"), help="train a new model version, or score users"
    )
    parser.add_argument("--target", required=True, help="target name (propensity.targets)")
    parser.add_argument(
        "--as-of",
        required=True,
        type=_as_of,
        help="train: the evaluation snapshot (training snapshots lie before it); score: when",
    )
    parser.add_argument("--version", help="model version to score with (default: latest)")


def _propensity(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.ml import propensity
    from microseg.ops.forget import recorded_job

    spark = _spark(
        cfg,
        args,
        f"propensity-{args.action}",
        f"training {args.target}" if args.action == "train" else f"scoring {args.target}",
    )
    with recorded_job(spark, cfg, job=f"propensity {args.action}", as_of=args.as_of) as run:
        if args.action == "train":
            result = propensity.train_propensity(
                spark, cfg, target=args.target, as_of=args.as_of, run_id=run.run_id
            )
            text = propensity.format_train_report(result)
        else:
            result = propensity.score_propensity(
                spark,
                cfg,
                target=args.target,
                as_of=args.as_of,
                version=args.version,
                run_id=run.run_id,
            )
            text = propensity.format_score_report(result)
    print(text)
    return 0


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as-of",
        required=True,
        type=_as_of,
        help="point in time for features, segments and scores (UTC unless an offset is given)",
    )


def _pipeline(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.pipeline import run_pipeline
    from microseg.serving.console import PipelineProgress

    spark = _spark(cfg, args, "pipeline", "reading the lake")
    with PipelineProgress() as progress:
        run_pipeline(spark, cfg, as_of=args.as_of, progress=progress)
    return 0


def _stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--available-now",
        action="store_true",
        help="process what the source holds now, then stop (instead of running until stopped)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop after this many seconds"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no line per micro-batch with segment changes"
    )


def _stream(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core.runs import recorded
    from microseg.serving.console import print_stream_changes, print_stream_report
    from microseg.streaming import query as streaming

    spark = _spark(cfg, args, "stream", "starting the query", kafka=cfg.stream.source == "kafka")
    with recorded(spark, cfg, job="stream") as run:
        report = streaming.run_stream(
            spark,
            cfg,
            run_id=run.run_id,
            available_now=args.available_now,
            timeout=args.timeout,
            on_changes=None if args.quiet else print_stream_changes,
        )
    print_stream_report(report)
    return 0


def _register(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.serving.console import print_register_report
    from microseg.serving.sql_catalog import register_tables, session_settings

    spark = _spark(cfg, args, "register", "registering tables", conf=session_settings(cfg))
    report = register_tables(spark, cfg.lake.root, prefix=cfg.sql.database_prefix)
    print_register_report(report)
    return 0


def _sql_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default sql.host)")
    parser.add_argument("--port", type=int, help="port (default sql.port)")


def _sql_server(cfg: Config, args: argparse.Namespace) -> int:
    import subprocess

    from microseg.serving.sql_catalog import run_thrift_server

    # Register first, in a process of its own: a local Derby metastore admits one JVM, and
    # this process's JVM would keep it open.
    register = [sys.executable, "-m", "microseg", "register"]
    if args.conf:
        register += ["--conf", args.conf]
    for override in args.overrides:
        register += ["--set", override]
    if args.verbose:
        register.append("--verbose")
    registered = subprocess.run(register, check=False)
    if registered.returncode != 0:
        return registered.returncode
    host, port = args.host or cfg.sql.host, args.port or cfg.sql.port
    print(f"microseg sql-server: Spark Thrift Server on jdbc:hive2://{host}:{port}/ (Ctrl-C stops)")
    sys.stdout.flush()
    return run_thrift_server(cfg, host=host, port=port)


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default serving.host)")
    parser.add_argument("--port", type=int, help="port (default serving.port)")


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    import uvicorn

    from microseg.serving.api import create_app

    app = create_app(cfg)
    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    print(
        f"microseg serve: http://{host}:{port}/ over the {cfg.serving.store} store "
        f"{app.state.store.location}; API docs at /docs (Ctrl-C stops)"
    )
    sys.stdout.flush()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info" if args.verbose else "warning",
        access_log=args.verbose,
    )
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        metavar="PATH",
        default="report/microseg-report.html",
        help="HTML file to write (default: report/microseg-report.html, relative to the "
        "current directory)",
    )


def _report(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.serving.html_report import write_report

    spark = _spark(cfg, args, "report", "reading the lake")
    written = write_report(spark, cfg.lake.root, args.output)
    print(
        f"{written.path} ({written.charts} charts, {written.bytes / 1e6:.1f} MB; "
        "self-contained: open it in a browser)"
    )
    return 0


def _runs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    parser.add_argument("--job", help="only this job, e.g. ingest or 'segments run'")


def _runs(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core.runs import recent_runs
    from microseg.serving.console import print_runs

    spark = _spark(cfg, args, "runs", "reading ops/runs")
    print_runs(recent_runs(spark, cfg.lake.root, limit=args.limit, job=args.job))
    return 0


def _status(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core import lake
    from microseg.ingest.quarantine import reason_counts
    from microseg.serving.console import print_status

    spark = _spark(cfg, args, "status", "counting rows")
    tables = lake.summarize(spark, cfg.lake.root)
    print_status(cfg.lake.root, tables, reason_counts(spark, cfg.lake.root))
    return 0


def _forget_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ids", nargs="*", metavar="ID", help="user ids or anonymous ids, as the person knows them"
    )
    parser.add_argument("--file", help="a file of ids, one per line (# starts a comment)")
    parser.add_argument(
        "--table",
        help="a table of ids: a Delta folder or a table name, its column --column",
    )
    parser.add_argument("--column", default="id", help="the ids' column of --table (default id)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="then read every file under the lake root for the people's ids and report each hit",
    )


def _forget_ids(spark_or_none, args: argparse.Namespace) -> list[str]:
    ids = list(args.ids)
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as lines:
                ids += [t for line in lines if (t := line.split("#", 1)[0].strip())]
        except OSError as exc:
            raise ConfigError(f"forget --file: {exc.strerror}: {args.file}") from None
    if args.table:
        spark = spark_or_none
        source = (
            spark.read.format("delta").load(args.table)
            if "/" in args.table
            else spark.read.table(args.table)
        )
        if args.column not in source.columns:
            raise ConfigError(
                f"forget --table {args.table} has no column '{args.column}' "
                f"(columns: {', '.join(source.columns)}); name it with --column"
            )
        ids += [r[0] for r in source.select(args.column).distinct().collect() if r[0]]
    if not ids:
        raise ConfigError("forget needs ids: as arguments, --file or --table")
    return ids


def _forget(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core.runs import recorded
    from microseg.ops.forget import record_erasure, require_key, run_forget
    from microseg.ops.verify import scan_lake
    from microseg.serving.console import print_erasure

    require_key(cfg)
    spark = _spark(cfg, args, "forget", "reading the ids")
    ids = _forget_ids(spark, args)
    with recorded(spark, cfg, job="forget") as run:
        report = run_forget(spark, cfg, ids, request_id=run.run_id)
        verification = None
        if args.verify:
            from microseg.activation.deliver import export_folders
            from microseg.core import progress

            progress.step("reading every file of the lake and the exports for their ids")
            verification = scan_lake(
                cfg.lake.root, report.subjects.keys, also=tuple(export_folders(cfg))
            )
        record_erasure(spark, cfg, report, verification=verification)
    print_erasure(report, verification)
    return 0 if verification is None or verification.clean else 1


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("assign", "analyze", "size", "validate"),
        help="assign: give members of each active experiment's segment a variant as of "
        "--as-of; analyze: exposures, lift, tests and SRM as of --as-of (bandits: new "
        "weights); size: users per variant to detect --mde at --baseline; validate: check "
        "the experiment file",
    )
    parser.add_argument("--as-of", type=_as_of, help="point in time (assign, analyze)")
    parser.add_argument("--experiment", help="analyze only this experiment id")
    parser.add_argument("--file", help="experiment file (default: experiments.file)")
    parser.add_argument("--baseline", type=float, help="size: control conversion rate, e.g. 0.1")
    parser.add_argument(
        "--mde", type=float, help="size: relative change to detect, e.g. 0.1 for +10%%"
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="size: significance level")
    parser.add_argument("--power", type=float, default=0.8, help="size: power")


def _experiment(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.serving import console as report

    if args.action == "size":
        from microseg.experiments.stats import sample_size_per_variant

        if args.baseline is None or args.mde is None:
            raise ConfigError("experiment size needs --baseline RATE and --mde CHANGE")
        try:
            n = sample_size_per_variant(args.baseline, args.mde, alpha=args.alpha, power=args.power)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        report.print_sample_size(args.baseline, args.mde, args.alpha, args.power, n)
        return 0
    from microseg.experiments.model import load_experiments

    experiments = load_experiments(cfg, args.file)
    if args.action == "validate":
        for e in experiments.experiments:
            print(f"{e.id}: segment {e.segment}, variants {', '.join(e.variants)}, {e.allocation}")
        return 0
    if args.as_of is None:
        raise ConfigError(f"experiment {args.action} needs --as-of TIME")
    if args.experiment:
        experiments[args.experiment]  # an unknown id is a usage error before Spark starts
    from microseg.ops.forget import recorded_job

    spark = _spark(cfg, args, f"experiment-{args.action}", f"{args.action} experiments")
    with recorded_job(spark, cfg, job=f"experiment {args.action}", as_of=args.as_of) as run:
        if args.action == "assign":
            from microseg.experiments.assign import run_assign

            result = run_assign(spark, cfg, as_of=args.as_of, run_id=run.run_id, path=args.file)
        else:
            from microseg.experiments.analyze import run_analyze

            result = run_analyze(
                spark,
                cfg,
                as_of=args.as_of,
                run_id=run.run_id,
                path=args.file,
                experiment_id=args.experiment,
            )
    if args.action == "assign":
        report.print_experiment_assign(result)
    else:
        report.print_experiment_results(result)
    return 0


def _activate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--destination",
        action="append",
        dest="destinations",
        help="only this destination id (repeatable; default: every destination)",
    )
    parser.add_argument("--file", help="destination file (default: destinations.file)")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="keep running: decide triggers and deliver new changes as events arrive",
    )
    parser.add_argument(
        "--available-now",
        action="store_true",
        help="--stream: process what bronze/events holds now, then stop",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="--stream: stop after this many seconds"
    )


def _activate(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.activation.deliver import run_activate
    from microseg.activation.model import load_destinations
    from microseg.ops.forget import recorded_job
    from microseg.serving.console import print_activate_report

    # config errors before Spark starts; Spark's Kafka connector only where a topic is one
    chosen = load_destinations(cfg, args.file).chosen(args.destinations)
    kafka = any(d.type == "kafka" for d in chosen)
    if args.stream:
        return _activate_stream(cfg, args, kafka)
    spark = _spark(cfg, args, "activate", "reading segment changes", kafka=kafka)
    with recorded_job(spark, cfg, job="activate") as run:
        result = run_activate(
            spark, cfg, run_id=run.run_id, destination_ids=args.destinations, path=args.file
        )
        failed = sum(d.failed for d in result.destinations)
        if failed:
            run.status = "failed"
            run.error = f"{failed} change(s) not delivered (gold/deliveries status failed)"
    print_activate_report(result)
    return 1 if failed else 0


def _activate_stream(cfg: Config, args: argparse.Namespace, kafka: bool) -> int:
    from pathlib import Path

    from microseg.activation.stream import run_activation_stream
    from microseg.activation.triggers import load_triggers
    from microseg.core.runs import recorded
    from microseg.serving.console import print_activation_stream_report

    if args.destinations:
        raise ConfigError("activate --stream serves every destination: drop --destination")
    if Path(cfg.triggers.file).is_file():
        load_triggers(cfg)  # a bad trigger file is an error before Spark starts
    spark = _spark(cfg, args, "activate-stream", "starting the activation query", kafka=kafka)
    with recorded(spark, cfg, job="activate stream") as run:
        report = run_activation_stream(
            spark,
            cfg,
            run_id=run.run_id,
            available_now=args.available_now,
            timeout=args.timeout,
            destinations_path=args.file,
        )
        if report.failed:
            run.status = "failed"
            run.error = f"{report.failed} change(s) not delivered (gold/deliveries status failed)"
    print_activation_stream_report(report)
    return 1 if report.failed else 0


def _triggers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=("run", "validate"),
        help="run: decide every firing due by --as-of into gold/trigger_firings; validate: "
        "check the trigger file",
    )
    parser.add_argument("--as-of", type=_as_of, help="point in time (run)")
    parser.add_argument(
        "--trigger", action="append", dest="triggers", help="only this trigger id (repeatable)"
    )
    parser.add_argument("--file", help="trigger file (default: triggers.file)")


def _triggers(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.activation.triggers import load_triggers
    from microseg.serving.console import print_trigger_report

    chosen = load_triggers(cfg, args.file).chosen(args.triggers)
    if args.action == "validate":
        for t in chosen:
            print(
                f"{t.id}: on {t.kind} {t.enter_segment or ', '.join(t.anchor_types or ['any'])}"
                f", delay {t.delay}, version {t.version}"
            )
        return 0
    if args.as_of is None:
        raise ConfigError("triggers run needs --as-of TIME")
    from microseg.activation.fire import run_triggers
    from microseg.ops.forget import recorded_job

    spark = _spark(cfg, args, "triggers", "deciding triggers")
    with recorded_job(spark, cfg, job="triggers", as_of=args.as_of) as run:
        report = run_triggers(
            spark,
            cfg,
            as_of=args.as_of,
            run_id=run.run_id,
            trigger_ids=args.triggers,
            path=args.file,
        )
    print_trigger_report(report)
    return 0


def _health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--as-of", type=_as_of, required=True, help="point in time")


def _health(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.ops.forget import recorded_job
    from microseg.segments.health import run_health
    from microseg.serving.console import print_health_report

    spark = _spark(cfg, args, "health", "checking segment health")
    with recorded_job(spark, cfg, job="health", as_of=args.as_of) as run:
        report = run_health(spark, cfg, as_of=args.as_of, run_id=run.run_id)
    print_health_report(report)
    return 0


def _maintain(cfg: Config, args: argparse.Namespace) -> int:
    from microseg.core.runs import recorded
    from microseg.ops.maintain import run_maintain
    from microseg.serving.console import print_maintain_report

    spark = _spark(cfg, args, "maintain", "reading the lake")
    with recorded(spark, cfg, job="maintain") as run:
        report = run_maintain(spark, cfg)
        failed = [t for t in report.tables if t.problem]
        if failed:
            run.status = "failed"
            run.error = f"{len(failed)} table(s) failed: " + "; ".join(
                f"{t.table}: {t.problem}" for t in failed
            )
    print_maintain_report(report, cfg)
    return 1 if failed else 0


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "generate",
            "write a synthetic event dataset with ground-truth personas",
            _generate_arguments,
            _generate,
        ),
        Command(
            "ingest",
            "validate input files into bronze/events and bronze/quarantine",
            _ingest_arguments,
            _ingest,
        ),
        Command(
            "sessionize",
            "build silver/identity_map and silver/sessions (incremental)",
            _sessionize_arguments,
            _sessionize,
        ),
        Command(
            "features",
            "compute gold/user_features as of a point in time",
            _features_arguments,
            _features,
        ),
        Command(
            "segments",
            "rule segments: run --as-of T, validate, show ID",
            _segments_arguments,
            _segments,
        ),
        Command(
            "cluster",
            "KMeans behavioral clusters: train --as-of T, assign --as-of T",
            _cluster_arguments,
            _cluster,
        ),
        Command(
            "propensity",
            "GBT propensity models: train --target X --as-of T, score --target X --as-of T",
            _propensity_arguments,
            _propensity,
        ),
        Command(
            "activate",
            "send segment changes and trigger firings to destinations through the delivery "
            "ledger; --stream: as events arrive",
            _activate_arguments,
            _activate,
        ),
        Command(
            "health",
            "segment KPIs, size and engagement anomalies, distinctness: --as-of T",
            _health_arguments,
            _health,
        ),
        Command(
            "triggers",
            "decide trigger firings (delay, inactivity, caps, quiet hours): run --as-of T",
            _triggers_arguments,
            _triggers,
        ),
        Command(
            "experiment",
            "A/B tests and bandits on segments: assign, analyze --as-of T; size; validate",
            _experiment_arguments,
            _experiment,
        ),
        Command(
            "pipeline",
            "ingest new files, then sessions, features, segments, clusters, scores as of T",
            _pipeline_arguments,
            _pipeline,
        ),
        Command(
            "stream",
            "keep streaming-capable segments fresh with Structured Streaming (Delta or Kafka)",
            _stream_arguments,
            _stream,
        ),
        Command(
            "register",
            "register the lake's tables by name (gold.segment_membership, ...) and BI views",
            lambda parser: None,
            _register,
        ),
        Command(
            "sql-server",
            "register the tables, then serve them over JDBC/ODBC with the Spark Thrift Server",
            _sql_server_arguments,
            _sql_server,
            progress=False,  # the server's own log is its progress, until it is stopped
        ),
        Command(
            "serve",
            "answer which segments a user is in over HTTP (the online store and the lake)",
            _serve_arguments,
            _serve,
            progress=False,  # a server: it prints where it listens, then serves until stopped
        ),
        Command(
            "forget",
            "erase people (user or anonymous ids) from every table, file and store; --verify",
            _forget_arguments,
            _forget,
        ),
        Command(
            "maintain",
            "OPTIMIZE, VACUUM and log settings of every table; maintain.retention drops old rows",
            lambda parser: None,
            _maintain,
        ),
        Command(
            "report",
            "write a self-contained HTML report of segments, models, quarantine and runs",
            _report_arguments,
            _report,
        ),
        Command(
            "runs",
            "list recent job runs from ops/runs",
            _runs_arguments,
            _runs,
        ),
        Command(
            "status",
            "list the lake's tables with row counts, and quarantine reasons",
            lambda parser: None,
            _status,
        ),
    )
}
