"""Dataset formats, line-numbered errors, batching and padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.config import DatasetConfig
from kubetune.trainer.data import (
    IGNORE_INDEX,
    Example,
    collate,
    rank_batches,
    read_jsonl,
    split_train_validation,
    tokenize_records,
)
from kubetune.trainer.errors import TrainerError


@pytest.fixture(scope="module")
def tokenizer(tiny_assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def records(*objects: dict) -> list[tuple[int, dict]]:
    return list(enumerate(objects, start=1))


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b"}'])
    assert read_jsonl(path) == [(1, {"text": "a"}), (3, {"text": "b"})]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "d.jsonl line 2: not valid JSON"),
        (['{"text": "a"}', "", '["a list"]'], "d.jsonl line 3: expected a JSON object, got list"),
        ([""], "no examples"),
    ],
)
def test_malformed_lines_are_reported_with_their_number(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        read_jsonl(write_lines(tmp_path / "d.jsonl", lines))


def test_text_format_trains_on_the_whole_text_between_bos_and_eos(tokenizer) -> None:
    [example] = tokenize_records(records({"body": "the red cat sits on the mat."}), tokenizer,
                                 DatasetConfig(uri="s3://d/x.jsonl", text_field="body"), 512)
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[1:-1]) == "the red cat sits on the mat."
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


def test_missing_field_names_the_line_the_field_and_the_setting(tokenizer) -> None:
    data = records({"text": "fine"}, {"txt": "typo"})
    with pytest.raises(TrainerError, match=r"line 2: field 'text' is missing \(set dataset.textField.*\['txt'\]"):
        tokenize_records(data, tokenizer, DatasetConfig(uri="s3://d/x.jsonl"), 512, source="s3://d/x.jsonl")


def test_instruction_format_takes_loss_on_the_response_only(tokenizer) -> None:
    config = DatasetConfig(uri="s3://d/x.jsonl", format="instruction")
    [example] = tokenize_records(records({"prompt": "where is the cat?", "response": "on the mat."}), tokenizer, config, 512)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained[:-1]) == "on the mat."
    assert trained[-1] == tokenizer.eos_token_id
    assert "where is the cat?" in tokenizer.decode(example.input_ids)
    with pytest.raises(TrainerError, match="line 1: field 'response' is missing"):
        tokenize_records(records({"prompt": "p"}), tokenizer, config, 512)


def test_chat_format_renders_the_tokenizer_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "what is one plus one?"}, {"role": "assistant", "content": "two."}]
    config = DatasetConfig(uri="s3://d/x.jsonl", format="chat")
    [example] = tokenize_records(records({"messages": messages}), tokenizer, config, 512)
    expected = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == expected
    assert expected.startswith("<s><|user|>what is one plus one?</s><|assistant|>two.")
    with pytest.raises(TrainerError, match="line 1: field 'messages' must be a non-empty list"):
        tokenize_records(records({"messages": "hi"}), tokenizer, config, 512)


def test_chat_format_without_a_chat_template_says_what_to_do(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")
    plain.chat_template = None
    with pytest.raises(TrainerError, match="tokenizer has no chat template.*chat_template"):
        tokenize_records(records({"messages": [{"role": "user", "content": "hi"}]}), plain,
                         DatasetConfig(uri="s3://d/x.jsonl", format="chat"), 512)


def test_examples_are_truncated_to_the_sequence_length(tokenizer) -> None:
    [example] = tokenize_records(records({"text": "the cat " * 100}), tokenizer, DatasetConfig(uri="s3://d/x.jsonl"), 16)
    assert len(example.input_ids) == len(example.labels) == 16


def fake_examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(n)), list(range(n))) for n in lengths]


def test_ranks_get_equal_disjoint_deterministic_shares() -> None:
    examples = fake_examples([5 + (i * 7) % 40 for i in range(103)])
    shares = [rank_batches(examples, 4, 3, rank, seed=1, epoch=0) for rank in range(3)]
    assert len({len(share) for share in shares}) == 1 and len(shares[0]) == 103 // 4 // 3
    seen = [id(e) for share in shares for batch in share for e in batch]
    assert len(seen) == len(set(seen))  # no example twice in one epoch
    assert rank_batches(examples, 4, 3, 1, seed=1, epoch=0) == shares[1]
    assert rank_batches(examples, 4, 3, 1, seed=1, epoch=1) != shares[1]


def test_batches_group_similar_lengths_to_limit_padding() -> None:
    examples = fake_examples([(i * 37) % 200 + 1 for i in range(256)])
    batches = rank_batches(examples, 8, 1, 0, seed=0, epoch=0)
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
    real = sum(len(e.input_ids) for b in batches for e in b)
    assert padded < 1.2 * real


def test_collate_pads_right_and_masks_padding_from_loss_and_attention() -> None:
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_validation_split_is_seeded_and_disjoint() -> None:
    examples = fake_examples(list(range(1, 41)))
    train, validation = split_train_validation(examples, 0.1, seed=3)
    assert len(validation) == 4 and len(train) == 36
    assert not {id(e) for e in train} & {id(e) for e in validation}
    assert split_train_validation(examples, 0.1, seed=3) == (train, validation)
    assert split_train_validation(examples, 0.0, seed=3) == (examples, [])


def test_demo_datasets_parse_in_their_formats(tiny_assets: Path, tokenizer) -> None:
    for name, fmt in [("train", "text"), ("chat", "chat"), ("instruction", "instruction")]:
        data = read_jsonl(tiny_assets / "datasets" / f"{name}.jsonl")
        examples = tokenize_records(data, tokenizer, DatasetConfig(uri="s3://d/x.jsonl", format=fmt), 512)
        assert len(examples) >= 200
        assert json.loads((tiny_assets / "datasets" / f"{name}.jsonl").read_text().splitlines()[0])
