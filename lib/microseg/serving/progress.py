"""The progress of a running command on stderr: its stage, its step and the elapsed time.

On a terminal, one transient status line (a rich Live display) that the command's output
scrolls above and that disappears when it ends. Otherwise (a file, a pipe, a test's capture)
nothing for quick steps, and one line for each step still running after `slow` seconds, so
a log shows where a long run spends its time without a line per step.

Stages and steps come through microseg.core.progress (INFO records of its logger).
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from microseg.core.progress import LOGGER, STAGE


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress(logging.Handler):
    """`with Progress("propensity train"):` shows the command, its stage (if it has several),
    its step and the elapsed time while the block runs (see the module docstring). `live`:
    the terminal display (default: when stderr is a terminal); `slow`: otherwise, a step
    gets its line when it has run this many seconds."""

    def __init__(
        self, command: str, *, live: bool | None = None, slow: float = 15.0, tick: float = 1.0
    ) -> None:
        super().__init__(level=logging.INFO)
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.slow, self.tick = slow, tick
        self.command = command
        self.stage = ""
        self.step = ""
        self.started = self.step_started = time.monotonic()
        self._announced = True  # the current step has its line (or needs none)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None
        self._display: Live | None = None

    # what the jobs and the command report

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, STAGE, False):
            self.set_stage(record.getMessage())
        else:
            self.set_step(record.getMessage())

    def set_step(self, step: str) -> None:
        with self._lock:
            self.step = step
            self.step_started = time.monotonic()
            self._announced = False

    def set_stage(self, stage: str) -> None:
        with self._lock:
            self.stage, self.step = stage, ""
            self.step_started = time.monotonic()
            self._announced = False

    # display

    def line(self) -> str:
        """`command stage · step · elapsed` (the elapsed time of the whole command)."""
        with self._lock:
            parts = [self.what(), self.step, _clock(time.monotonic() - self.started)]
        return " · ".join(p for p in parts if p)

    def what(self) -> str:
        return f"{self.command} {self.stage}" if self.stage else self.command

    def __rich__(self) -> RenderableType:
        return Text(self.line(), style="dim")

    def _announce_slow_steps(self) -> None:
        while not self._done.wait(self.tick):
            with self._lock:
                due = not self._announced and time.monotonic() - self.step_started >= self.slow
                if due:
                    self._announced = True
                    text = f"{self.what()}: {self.step or 'working'}"
                    elapsed = _clock(time.monotonic() - self.started)
            if due:
                print(f"... {text} ({elapsed})", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        progress_log = logging.getLogger(LOGGER)
        progress_log.addHandler(self)
        progress_log.setLevel(logging.INFO)
        self.started = self.step_started = time.monotonic()
        self._announced = False
        if self.live:
            self._display = Live(
                Spinner("dots", text=self),
                console=self.console,
                transient=True,
                refresh_per_second=4,
                # output to the same terminal scrolls above the line; stdout sent elsewhere
                # (a file, a pipe) stays there
                redirect_stdout=sys.stdout.isatty(),
            )
            self._display.start()
        else:
            self._ticker = threading.Thread(
                target=self._announce_slow_steps, name="microseg-progress", daemon=True
            )
            self._ticker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        logging.getLogger(LOGGER).removeHandler(self)
        self._done.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._display is not None:
            self._display.stop()
