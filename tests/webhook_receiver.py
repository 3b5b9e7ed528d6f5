"""A real HTTP receiver on loopback for the webhook tests, as a marketing tool would run one:
it applies each change once, keyed by the change's idempotency key, and says how often a key
came again. It misbehaves on purpose:

- `fail_share` of the requests fail, decided by a seeded random generator, alternately with
  a 503 before anything is applied and after applying the batch, by closing the connection
  without an answer (the sender cannot tell that the batch arrived);
- `kill_pid` is sent SIGKILL after the `kill_after`-th applied batch, before the answer (the
  sender dies between sending and recording).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, *, fail_share: float = 0.0, seed: int = 1) -> None:
        self.fail_share = fail_share
        self.random = random.Random(seed)
        self.applied: dict[str, dict] = {}  # idempotency key -> the change
        self.repeats: dict[str, int] = {}  # key -> times it came again
        self.removes: list[str] = []
        self.requests = 0
        self.failed = 0
        self.batches_applied = 0
        self.drop_next = False  # the kind of the next failure: 503 first, then a lost answer
        self.kill_pid: int | None = None
        self.kill_after: int | None = None
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.requests += 1
                    receiver.headers.append(dict(self.headers))
                    fail = receiver.random.random() < receiver.fail_share
                    drop = fail and receiver.drop_next
                    if fail:
                        receiver.drop_next = not receiver.drop_next
                    if fail and not drop:
                        receiver.failed += 1
                        self.send_response(503)
                        self.end_headers()
                        return
                    for change in body.get("changes", []):
                        key = change["idempotency_key"]
                        if key in receiver.applied:
                            receiver.repeats[key] = receiver.repeats.get(key, 0) + 1
                        else:
                            receiver.applied[key] = change
                    receiver.removes.extend(r["user_key"] for r in body.get("removes", []))
                    receiver.batches_applied += 1
                    if receiver.kill_pid and receiver.batches_applied == receiver.kill_after:
                        os.kill(receiver.kill_pid, signal.SIGKILL)
                        receiver.kill_pid = None
                        self.close_connection = True
                        return
                    if drop:
                        receiver.failed += 1
                        self.close_connection = True  # applied, but no answer
                        return
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
