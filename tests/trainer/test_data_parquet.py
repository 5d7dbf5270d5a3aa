"""Parquet datasets: read like JSONL (recognised by content), errors name the column or row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune.api.spec import Dataset
from kubetune.trainer.data import IGNORE_INDEX, prepare_datasets
from kubetune.trainer.errors import TrainerError


@pytest.fixture(scope="module")
def tokenizer(tiny_assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_chat_rows_train_like_the_same_jsonl_lines(tmp_path: Path, tokenizer, tiny_assets: Path) -> None:
    import json

    jsonl = tiny_assets / "datasets" / "chat.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    # A name no JSONL reader would guess: Parquet is recognised by its magic bytes.
    parquet = write_parquet(tmp_path / "train.jsonl", rows)
    config = Dataset(uri="s3://data/chat.parquet", format="chat")
    from_parquet = prepare_datasets(parquet, None, tokenizer, config, 512, seed=0)
    from_jsonl = prepare_datasets(jsonl, None, tokenizer, config, 512, seed=0)
    assert from_parquet.train == from_jsonl.train and len(from_parquet.train) == len(rows)


def test_parquet_instruction_rows_with_extra_columns(tmp_path: Path, tokenizer) -> None:
    path = write_parquet(tmp_path / "d.parquet", [
        {"id": 1, "question": "where is the cat?", "answer": "on the mat."},
        {"id": 2, "question": "where is the dog?", "answer": "on the roof."},
    ])
    config = Dataset(uri="s3://data/x.parquet", format="instruction", prompt_field="question", response_field="answer")
    examples = prepare_datasets(path, None, tokenizer, config, 512, seed=0).train
    trained = [tokenizer.decode([t for t, l in zip(e.input_ids, e.labels) if l != IGNORE_INDEX]) for e in examples]
    assert trained == ["on the mat.</s>", "on the roof.</s>"]


def test_a_missing_column_is_named_with_the_setting_and_the_columns_present(tmp_path: Path, tokenizer) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"body": "the cat."}])
    with pytest.raises(TrainerError, match=r"s3://data/x.parquet: column 'text' is missing \(set dataset.textField "
                                           r".*columns in this file: \['body'\]"):
        prepare_datasets(path, None, tokenizer, Dataset(uri="s3://data/x.parquet"), 512, seed=0)


def test_a_null_value_is_named_with_its_row(tmp_path: Path, tokenizer) -> None:
    path = write_parquet(tmp_path / "d.parquet", [{"text": "a"}, {"text": "b"}, {"text": None}])
    with pytest.raises(TrainerError, match="s3://data/x.parquet row 3: field 'text' is missing"):
        prepare_datasets(path, None, tokenizer, Dataset(uri="s3://data/x.parquet"), 512, seed=0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PAR1 this is not really parquet", "not a readable Parquet file"),
        (None, r"the dataset has no examples \(the Parquet file has no rows\)"),
    ],
)
def test_broken_or_empty_parquet_says_so(tmp_path: Path, tokenizer, content: bytes | None, message: str) -> None:
    path = tmp_path / "d.parquet"
    if content is None:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(TrainerError, match=f"s3://data/x.parquet: {message}"):
        prepare_datasets(path, None, tokenizer, Dataset(uri="s3://data/x.parquet"), 512, seed=0)
