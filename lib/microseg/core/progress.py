"""Steps of a long job, for the person watching it.

A job says which step it starts with `step("write bronze/events")`; the step lasts until the
job's next step or its end. A command that runs several jobs (the pipeline) says which one
starts with `stage(name)`. Both are INFO records of the `microseg.progress` logger, so any
layer can mark them and they cost nothing when nobody listens: the CLI shows them with the
elapsed time (microseg.serving.progress), as a live status line on a terminal and as a line
per step that runs long otherwise.
"""

from __future__ import annotations

import logging

LOGGER = "microseg.progress"
STAGE = "microseg_stage"  # the attribute that marks a stage's record

log = logging.getLogger(LOGGER)


def step(name: str) -> None:
    """Mark the start of step `name` of the running job."""
    log.info(name)


def stage(name: str) -> None:
    """Mark the start of stage `name` of a command that runs several jobs."""
    log.info(name, extra={STAGE: True})
