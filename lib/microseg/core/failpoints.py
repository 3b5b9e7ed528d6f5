"""Named crash points for recovery tests: `MICROSEG_FAILPOINTS=ingest.after_events` makes the
process die there at once, as a kill would, without cleanup. Unset, they cost nothing."""

from __future__ import annotations

import os
import sys

ENV_VAR = "MICROSEG_FAILPOINTS"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL


def failpoint(name: str) -> None:
    armed = os.environ.get(ENV_VAR, "")
    if name in {part.strip() for part in armed.split(",")}:
        sys.stderr.write(f"microseg: failpoint {name} hit, exiting without cleanup\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
