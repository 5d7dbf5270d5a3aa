"""The trainer benchmark's own parts (the benchmark itself runs in ``make bench``, not here):
the workload is seeded and long-tailed, and the report computes the ratios the issue asks for
and keeps the rest of BENCHMARKS.md intact."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import trainer_bench  # noqa: E402
from workload import Workload, build, read_texts, token_ids  # noqa: E402


@pytest.fixture(scope="module")
def quick_workload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(Workload.quick(), tmp_path_factory.mktemp("bench") / "workload")


def test_the_workload_is_seeded(quick_workload: dict[str, Path], tmp_path: Path) -> None:
    again = build(Workload.quick(), tmp_path / "workload")
    for name in ("train", "eval"):
        assert quick_workload[name].read_bytes() == again[name].read_bytes()
    assert (quick_workload["model"] / "model.safetensors").read_bytes() == (again["model"] / "model.safetensors").read_bytes()


def test_lengths_are_long_tailed_within_the_bounds(quick_workload: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    workload = Workload.quick()
    tokenizer = AutoTokenizer.from_pretrained(quick_workload["model"])
    lengths = [len(token_ids(tokenizer, text)) for text in read_texts(quick_workload["train"])]
    assert len(lengths) == workload.train_examples
    assert workload.min_tokens <= min(lengths) and max(lengths) <= workload.max_tokens
    # Long tail: the mean sits well above the median and some examples are several times it.
    median = statistics.median(lengths)
    assert statistics.mean(lengths) > 1.1 * median and max(lengths) > 3 * median


def test_the_report_has_the_ratios_and_losses_the_issue_names() -> None:
    def run(rate: float, loss: float) -> dict:
        return {"tokens": int(rate * 10), "positions": int(rate * 12), "trainSeconds": 10.0,
                "tokensPerSecond": rate, "evalLoss": loss}

    runs = {"kubetune": run(1000, 6.9), "bare": run(1020, 6.9), "hf_default": run(400, 7.0),
            "hf_group_by_length": run(800, 7.0), "hf_flatten": run(600, 7.1)}
    report = trainer_bench._report(Workload(), runs, base_eval=9.2)
    assert report["ratio_vs_hf"] == pytest.approx(2.5)
    assert report["ratio_vs_hf_best"] == pytest.approx(1.25) and report["hf_best"] == "hf_group_by_length"
    assert report["ratio_vs_bare"] == pytest.approx(1000 / 1020)
    assert report["eval_loss"] == 6.9 and report["eval_loss_hf"] == 7.0
    assert report["eval_loss_fall"] == pytest.approx(2.3)
    json.dumps(report)  # what make bench writes


def test_the_table_replaces_only_its_own_section(tmp_path: Path) -> None:
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(f"# Benchmarks\nintro\n{trainer_bench.TABLE_BEGIN}\nold table\n{trainer_bench.TABLE_END}\nafter\n")
    runs = {"kubetune": {"tokens": 90, "positions": 100, "trainSeconds": 10.0, "tokensPerSecond": 9.0, "evalLoss": 6.9},
            "bare": {"tokens": 90, "positions": 100, "trainSeconds": 9.0, "tokensPerSecond": 10.0, "evalLoss": 6.9}}
    report = {"contenders": runs, "baseEvalLoss": 9.2, "processes": 2, "measuredAt": "2026-11-25T00:00:00+00:00",
              "machine": {"cpu": "Test CPU", "cores": 2}}
    trainer_bench._write_table(markdown, report)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\nintro\n") and text.endswith("after\n") and "old table" not in text
    assert "| bare | 10 | 10.0% | 9 | 6.900 | 0.90x |" in text
