"""The trainer benchmark's own parts (the benchmark itself runs in ``make bench``, not here):
the workloads are seeded and long-tailed, the chat one has the vocabulary it claims and loss on
the assistant's replies only, and the report computes the ratios the issues ask for and keeps
the rest of BENCHMARKS.md intact."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import trainer_bench  # noqa: E402
from workload import Workload, build, examples, read_texts, token_ids  # noqa: E402


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


@pytest.fixture(scope="module")
def chat_workload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(Workload.realistic_quick(), tmp_path_factory.mktemp("bench") / "chat")


def test_the_chat_workload_is_seeded_with_the_vocabulary_it_claims(chat_workload: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    again = build(Workload.realistic_quick(), tmp_path / "chat")
    for name in ("train", "eval"):
        assert chat_workload[name].read_bytes() == again[name].read_bytes()
    workload = Workload.realistic_quick()
    assert len(AutoTokenizer.from_pretrained(chat_workload["model"])) == workload.vocab_size
    assert AutoConfig.from_pretrained(chat_workload["model"]).vocab_size == workload.vocab_size


def test_chat_examples_train_on_the_assistants_replies_only(chat_workload: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    workload = Workload.realistic_quick()
    tokenizer = AutoTokenizer.from_pretrained(chat_workload["model"])
    made = examples(workload, tokenizer, chat_workload["train"])
    assert len(made) == workload.train_examples
    lengths = [len(example.input_ids) for example in made]
    assert workload.min_tokens <= min(lengths) and max(lengths) <= workload.max_tokens
    assert statistics.mean(lengths) > 1.1 * statistics.median(lengths)  # a long tail
    share = sum(example.trained_tokens for example in made) / sum(lengths)
    assert 0.35 < share < 0.65, share  # about half: the user's turns carry no loss
    for example in made[:5]:
        trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])
        assert "describe" not in trained and "<|user|>" not in trained and trained.startswith("the ")


def run(rate: float, loss: float, peak: int = 2**30, wall: float = 100.0) -> dict:
    return {"tokens": int(rate * 10), "positions": int(rate * 12), "trainSeconds": 10.0,
            "tokensPerSecond": rate, "evalLoss": loss, "peakMemoryBytes": peak, "wallSeconds": wall}


def test_the_report_has_the_ratios_and_losses_the_issues_name() -> None:
    runs = {"kubetune": run(1000, 6.9, peak=2**30, wall=90), "bare": run(1020, 6.9),
            "hf_default": run(400, 7.0), "hf_group_by_length": run(800, 7.0, peak=4 * 2**30, wall=120),
            "hf_flatten": run(600, 7.1)}
    text = trainer_bench._workload_report(Workload(), runs, base_eval=9.2)
    chat = trainer_bench._workload_report(Workload.realistic(), runs, base_eval=11.8)
    report = trainer_bench._report({"text": text, "chat-128k": chat, "chat-32k": chat})
    assert report["ratio_vs_hf"] == pytest.approx(2.5)  # the text workload's keys stay at the top
    assert report["ratio_vs_hf_best"] == pytest.approx(1.25) and report["hf_best"] == "hf_group_by_length"
    assert report["ratio_vs_bare"] == pytest.approx(1000 / 1020)
    assert report["eval_loss"] == 6.9 and report["eval_loss_hf"] == 7.0
    assert report["eval_loss_fall"] == pytest.approx(2.3)
    realistic = report["realistic"]
    assert realistic["ratio_vs_hf_best"] == pytest.approx(1.25) and realistic["ratio_vs_bare"] == pytest.approx(1000 / 1020)
    assert realistic["memory_ratio_vs_hf_best"] == pytest.approx(0.25)
    assert realistic["wall_ratio_vs_hf_best"] == pytest.approx(0.75)
    assert (realistic["eval_loss"], realistic["eval_loss_hf_best"]) == (6.9, 7.0)
    assert realistic["vocab32k"]["ratio_vs_hf_best"] == pytest.approx(1.25)
    assert set(report["workloads"]) == {"text", "chat-128k", "chat-32k"}
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
    # Another workload's table goes in a section of its own, with memory and wall time.
    runs = {"kubetune": run(9.0, 6.9, peak=2**30, wall=90), "bare": run(10.0, 6.9, peak=2**29, wall=80)}
    trainer_bench._write_table(markdown, {**report, "contenders": runs}, *trainer_bench.markers("chat-128k"))
    text = markdown.read_text()
    assert "| bare | 10 | 16.7% | 10 | 512 | 80 | 6.900 | 0.90x |" in text
    assert "| bare | 10 | 10.0% | 9 | 6.900 | 0.90x |" in text  # the first table is still there
