"""The termination message: what a worker leaves for the operator, within Kubernetes' 4096
bytes, and what the operator accepts as one."""

from __future__ import annotations

import json

from kubetune.api import TerminationMessage
from kubetune.api.termination import MAX_BYTES


def test_a_success_round_trips_with_camel_case_keys() -> None:
    message = TerminationMessage(outcome="Succeeded", steps=30, total_steps=30, final_loss=1.0543, tokens=7680,
                                 adapter_uri="s3://adapters/q/")
    text = message.render()
    assert json.loads(text) == {"outcome": "Succeeded", "steps": 30, "totalSteps": 30, "finalLoss": 1.0543,
                                "tokens": 7680, "adapterUri": "s3://adapters/q/"}
    assert TerminationMessage.parse(text) == message


def test_a_failure_is_one_line_and_an_overlong_one_is_cut_to_fit() -> None:
    assert TerminationMessage.failed("line 3:\n  not valid JSON").error == "line 3: not valid JSON"
    text = TerminationMessage.failed("line 1: " + "é" * 5000).render()
    assert len(text.encode()) <= MAX_BYTES
    error = json.loads(text)["error"]
    assert error.startswith("line 1: éé") and error.endswith("...")


def test_only_the_trainers_json_counts_as_an_outcome() -> None:
    for other in (None, "", "plain log line", "{not json", json.dumps({"some": "json"}), "[1, 2]",
                  json.dumps({"outcome": "Maybe"})):
        assert TerminationMessage.parse(other) is None


def test_a_newer_trainer_saying_more_is_still_understood() -> None:
    parsed = TerminationMessage.parse(json.dumps({"outcome": "Failed", "error": "boom", "rank": 3}))
    assert parsed is not None and parsed.error == "boom"
