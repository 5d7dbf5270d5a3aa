"""Where worker logs are kept: beside the checkpoints (else the adapter), never inside them and
never in another bucket."""

from __future__ import annotations

import pytest

from kubetune.api.logs import attempt_logs_uri, logs_uri, worker_log_uri
from kubetune.api.spec import Output


@pytest.mark.parametrize("adapter, checkpoints, expected", [
    ("s3://adapters/bot/", "s3://ckpt/bot/", "s3://ckpt/bot.logs/"),
    ("s3://adapters/team/bot/", None, "s3://adapters/team/bot.logs/"),
    # At a bucket's root: inside it, hidden; "s3://adapters.logs/" would be another bucket.
    ("s3://adapters/", None, "s3://adapters/.logs/"),
    ("s3://adapters/bot/", "s3://ckpt/", "s3://ckpt/.logs/"),
])
def test_logs_sit_beside_the_checkpoints_or_the_adapter(adapter: str, checkpoints: str | None, expected: str) -> None:
    output = Output(adapter_uri=adapter, checkpoint_uri=checkpoints)
    assert logs_uri(output) == expected
    assert worker_log_uri(attempt_logs_uri(output, 2), "bot-worker-0") == f"{expected}attempt-2/bot-worker-0.log"
