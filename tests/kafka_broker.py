"""A real single-node Kafka broker (KRaft: broker and controller in one JVM) for tests.

The broker's JARs come from Maven Central (org.apache.kafka:kafka_2.13), resolved once into
the microseg JAR cache by the same Ivy resolution as Delta's (microseg.core.jars). `start_broker`
raises BrokerUnavailable with the reason when the broker cannot be started here (no Java, the
JARs cannot be resolved, it does not come up), so that the test can skip and print it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from microseg.core.jars import resolved_jars

KAFKA = "org.apache.kafka:kafka_2.13:4.1.1"
JAR_CACHE = os.path.expanduser("~/.cache/microseg/jars")


class BrokerUnavailable(Exception):
    """The broker cannot be started on this machine; the message says why."""


@dataclass
class Broker:
    bootstrap_servers: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _properties(workdir: Path, port: int, controller_port: int) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={workdir / 'data'}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "",
        ]
    )


_LOG4J = """\
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d %p %c: %m%n
"""


def start_broker(workdir: Path, *, timeout: float = 120.0) -> Broker:
    java = shutil.which("java")
    if java is None:
        raise BrokerUnavailable("no `java` on PATH")
    try:
        # Spark's resolver leaves Scala out (every Spark has it): take pyspark's, the same 2.13
        jars = [*resolved_jars(JAR_CACHE, KAFKA), *_scala_jars()]
    except Exception as exc:  # noqa: BLE001 - any failure to resolve means: skip, say why
        raise BrokerUnavailable(f"cannot resolve {KAFKA} from Maven Central: {exc}") from exc
    workdir.mkdir(parents=True, exist_ok=True)
    port, controller_port = _free_port(), _free_port()
    props = workdir / "server.properties"
    props.write_text(_properties(workdir, port, controller_port))
    (workdir / "log4j2.properties").write_text(_LOG4J.format(path=workdir / "broker.log"))
    base = [
        java,
        "-Xmx512m",
        f"-Dlog4j2.configurationFile={workdir / 'log4j2.properties'}",
        "-cp",
        os.pathsep.join(jars),
    ]
    formatted = subprocess.run(
        [*base, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if formatted.returncode != 0:
        raise BrokerUnavailable(f"kafka storage format failed: {formatted.stderr[-2000:]}")
    log = workdir / "broker.out"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*base, "kafka.Kafka", str(props)], stdout=out, stderr=subprocess.STDOUT
        )
    broker = Broker(f"127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerUnavailable(f"the broker exited ({process.returncode}): {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return broker
        except OSError:
            time.sleep(0.5)
    broker.stop()
    raise BrokerUnavailable(f"the broker did not listen within {timeout:.0f} s: {_tail(log)}")


def _scala_jars() -> list[str]:
    import pyspark

    found = sorted(Path(pyspark.__file__).parent.joinpath("jars").glob("scala-library-*.jar"))
    if not found:
        raise BrokerUnavailable("no scala-library JAR in pyspark's jars folder")
    return [str(j) for j in found]


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-2000:]
    except OSError:
        return "(no log)"
