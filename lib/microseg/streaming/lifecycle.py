"""Stopping a streaming query between micro-batches, and telling the user what it does.

StreamingQuery.stop() cancels the query's Spark jobs and interrupts its thread at once. In the
middle of a micro-batch, inside the foreachBatch function, that ends in errors (a cancelled
job, an interrupted Delta commit) with Java stack traces, and leaves the batch half-written
until it is replayed at the next start. So `microseg stream --timeout` lets the running
micro-batch finish first: a BatchGate wraps the foreachBatch function, and
stop_between_batches closes it (the running batch is written, a later one is held before it
writes anything) before it calls stop(). A held batch waits in the query's own thread until
stop() interrupts it, and then fails in the way Spark takes for what it is: the query being
stopped. Nothing of the held batch is written or committed; the next start runs it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NoReturn

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from microseg.core import progress

BatchFunction = Callable[[DataFrame, int], None]

# Set by a SIGTERM while a stream waits (microseg.cli): the wait returns at its next check,
# about once a second, and the stream stops between micro-batches. A signal must not raise
# inside a Py4J call: that breaks the connection to the JVM.
stop_requested = threading.Event()


class BatchGate:
    """Lets foreachBatch functions run until the gate closes (see the module docstring)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._running = 0
        self._closed = False
        # the id of a micro-batch that came after the gate closed and waits for stop()
        self.held: int | None = None

    def wrap(self, write: BatchFunction) -> BatchFunction:
        """`write`, run only while the gate is open."""

        def gated(batch_df: DataFrame, batch_id: int) -> None:
            with self._changed:
                closed = self._closed
                self._running += 0 if closed else 1
            if closed:
                self.held = batch_id
                _hold_until_stopped(batch_df.sparkSession)  # raises when stop() comes
            try:
                write(batch_df, batch_id)
            finally:
                with self._changed:
                    self._running -= 1
                    self._changed.notify_all()

        return gated

    def close(self) -> None:
        """Let no micro-batch start writing from now on; return once the running ones are
        written."""
        with self._changed:
            self._closed = True
            self._changed.wait_for(lambda: self._running == 0)


# How Spark recognizes a foreachBatch function that failed because stop() interrupted the
# query's thread (StreamExecution.PROXY_ERROR, SPARK-39218): the Python error's text carries
# a Py4JJavaError of an InterruptedException. The pattern is matched recursively over every
# character that follows its start, so the text must end there: with the real error's Java
# stack trace after it, the match overflows the thread's stack (a StackOverflowError).
STOPPED = (
    "py4j.protocol.Py4JJavaError: An error occurred while calling z:java.lang.Thread.sleep.\n"
    ": java.lang.InterruptedException (the query was stopped before this micro-batch wrote)"
)


class QueryStopped(Exception):
    """A held micro-batch ends: the query is being stopped (see STOPPED)."""


def _hold_until_stopped(spark: SparkSession, limit: float = 600.0) -> NoReturn:
    """Sleep in the JVM until stop() interrupts the query's thread, then raise QueryStopped.

    PySpark pins this Python callback to the JVM thread that called it (the query's), so the
    sleep runs in that thread; `limit` guards against a gateway without pinned threads."""
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            spark._jvm.java.lang.Thread.sleep(200)
    except Py4JJavaError as exc:
        if exc.java_exception.getClass().getName() != "java.lang.InterruptedException":
            raise
        raise QueryStopped(STOPPED) from None
    raise RuntimeError(f"the streaming query was not stopped within {limit:.0f} s")


def stop_between_batches(
    queries: list[StreamingQuery], gate: BatchGate, *, commit_wait: float = 60.0
) -> None:
    """Stop the active queries after their running micro-batch: close the gate (its writes
    finish), give each query up to `commit_wait` seconds to commit it (offsets and state),
    then stop() it."""
    if not any(q.isActive for q in queries):
        return
    progress.step("stopping after the current micro-batch")
    gate.close()
    deadline = time.monotonic() + commit_wait
    for query in queries:
        while (
            query.isActive
            and gate.held is None
            and query.status["isTriggerActive"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        if query.isActive:
            query.stop()


class StatusSteps:
    """The segment query's status as progress steps, marked when they change."""

    def __init__(self) -> None:
        self.current: str | None = None

    def update(self, query: StreamingQuery) -> None:
        status = query.status
        busy = status["isTriggerActive"] and status["isDataAvailable"]
        step = "processing a micro-batch" if busy else "waiting for events"
        if step != self.current:
            self.current = step
            progress.step(step)
