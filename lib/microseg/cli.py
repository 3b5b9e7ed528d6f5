"""`microseg <command> [--conf FILE] [--set key=value ...] [options]`.

Exit status: 0 success, 2 usage or configuration error, 1 job failure; on failure one line on
stderr says what went wrong. While a command runs, stderr shows its progress (stage, step,
elapsed time; microseg.serving.progress). `--verbose` adds Spark's warnings, Java stack traces,
Python warnings, and the traceback of a failure.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import traceback
import warnings

from microseg.commands import COMMANDS, Command
from microseg.core.config import Config, ConfigError, load_config, resolve_conf_path

log = logging.getLogger("microseg")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (then exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--conf",
        metavar="FILE",
        help="config file (default: $MICROSEG_CONF or conf/local.yaml); may `extends:` a base",
    )
    common.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one config key, e.g. --set spark.shuffle_partitions=4 (repeatable)",
    )
    common.add_argument(
        "--verbose",
        "-v",
        "--debug",
        action="store_true",
        help="also show Spark's warnings, Java stack traces, Python warnings, and the "
        "traceback of a failure",
    )
    parser = _Parser(
        prog="microseg",
        description="Behavioral micro-segmentation on Apache Spark and Delta Lake.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, parents=[common]))
    batch = sub.add_parser(
        "batch",
        help="run a file of microseg commands in one process and one Spark session",
        parents=[common],
    )
    batch.add_argument(
        "file",
        help="one command per line, without `microseg` (`-`: standard input); `#` starts a "
        "comment, `## text` prints text as a heading; --conf/--set/--verbose given to batch "
        "apply to every line",
    )
    return parser


def _batch(args: argparse.Namespace) -> int:
    """Run each line's command through main() in this process: the first one that needs
    Spark starts it, the others reuse the session (no JVM start, warm caches). Stops at the
    first line that fails and returns its exit status."""
    import shlex

    from rich.console import Console

    shared = [
        *(["--conf", args.conf] if args.conf else []),
        *[option for value in args.overrides for option in ("--set", value)],
        *(["--verbose"] if args.verbose else []),
    ]
    with sys.stdin if args.file == "-" else open(args.file, encoding="utf-8") as lines:
        steps = list(enumerate(lines, 1))
    console = Console(highlight=False)
    for number, line in steps:
        text = line.strip()
        if text.startswith("##"):
            console.print(f"\n[bold]== {text[2:].strip()}[/bold]")
            continue
        if not text or text.startswith("#"):
            continue
        argv = shlex.split(text)
        argv = argv[1:] if argv[0] == "microseg" else argv
        if argv[0] == "batch":
            print(f"microseg batch: line {number}: a batch cannot run a batch", file=sys.stderr)
            return 2
        try:
            status = main([*argv, *shared])
        except SystemExit as exc:  # a usage error on that line (argparse exits)
            status = exc.code if isinstance(exc.code, int) else 2
        if status:
            print(f"microseg batch: line {number} failed ({text})", file=sys.stderr)
            return status
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 500 else first[:497] + "..."


class _Stderr(logging.Handler):
    """Log records as plain lines on sys.stderr as it is now (a live progress display
    redirects it, so its lines scroll above the display)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def _configure_logging(verbose: bool) -> None:
    """microseg's messages on stderr (with --verbose its DEBUG ones too, e.g. step timings);
    py4j's only with --verbose (its callback server narrates at INFO, and what it reports at
    ERROR reaches the command as its failure)."""
    from microseg.core.progress import LOGGER

    root = logging.getLogger()
    if not root.handlers:  # a host (pytest, a notebook) may have its own
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    logging.getLogger("microseg").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("py4j").setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
    logging.getLogger(LOGGER).propagate = False  # steps are for the progress display only


def _run(command: Command, cfg: Config, args: argparse.Namespace) -> int:
    if not command.progress:
        return command.run(cfg, args) or 0
    from microseg.serving.progress import Progress

    label = " ".join(str(a) for a in (args.command, getattr(args, "action", None)) if a)
    with Progress(label):
        return command.run(cfg, args) or 0


def _terminate(signum, frame) -> None:
    """SIGTERM: a waiting stream stops between micro-batches and reports; anything else stops
    as at Ctrl-C."""
    from microseg.streaming import lifecycle

    lifecycle.stop_requested.set()
    if not _STREAMING:
        raise KeyboardInterrupt


_STREAMING: list[bool] = []  # non-empty while `microseg stream` runs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"microseg {args.command}"
    _configure_logging(args.verbose)
    started = time.monotonic()
    # SIGTERM (a service manager, a container stop, `kill`) stops a command: `microseg
    # stream` after its running micro-batch, with its report (see _terminate)
    signal.signal(signal.SIGTERM, _terminate)
    if args.command == "stream":
        _STREAMING.append(True)
    try:
        with warnings.catch_warnings():
            if not args.verbose:  # libraries' deprecation notices are not the user's concern
                warnings.simplefilter("ignore")
            if args.command == "batch":
                return _batch(args)
            cfg = load_config(resolve_conf_path(args.conf), args.overrides)
            status = _run(COMMANDS[args.command], cfg, args)
    except ConfigError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a job failure: one clear line, details with --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"{prog}: failed: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    log.info("%s finished in %.1f s", prog, time.monotonic() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
