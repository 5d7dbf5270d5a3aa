"""Dataset files to examples: formats, what carries loss, line-numbered errors, long examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.spec import Dataset
from kubetune.trainer.data import (
    IGNORE_INDEX,
    Example,
    collate,
    fit_to_length,
    prepare_datasets,
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


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_read_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b"}'])
    assert read_jsonl(path) == [(1, {"text": "a"}), (3, {"text": "b"})]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "s3://data/x.jsonl line 2: not valid JSON"),
        (['{"text": "a"}', "", '["a list"]'], "s3://data/x.jsonl line 3: expected a JSON object, got list"),
        ([""], r"s3://data/x.jsonl: the dataset has no examples \(the file is empty\)"),
    ],
)
def test_malformed_lines_are_reported_with_their_number(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(TrainerError, match=message):
        read_jsonl(write_lines(tmp_path / "d.jsonl", lines), source="s3://data/x.jsonl")


def test_a_binary_file_that_is_not_parquet_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(TrainerError, match="line 2: not UTF-8 text .*JSONL or Parquet"):
        read_jsonl(path)


def test_text_format_trains_on_the_whole_text_between_bos_and_eos(tokenizer) -> None:
    [example] = tokenize_records(records({"body": "the red cat sits on the mat."}), tokenizer,
                                 Dataset(uri="s3://data/x.jsonl", text_field="body"))
    assert example.input_ids[0] == tokenizer.bos_token_id and example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[1:-1]) == "the red cat sits on the mat."
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


def test_missing_field_names_the_line_the_field_and_the_setting(tokenizer) -> None:
    data = records({"text": "fine"}, {"txt": "typo"})
    with pytest.raises(TrainerError, match=r"s3://data/x.jsonl line 2: field 'text' is missing \(set dataset.textField.*\['txt'\]"):
        tokenize_records(data, tokenizer, Dataset(uri="s3://data/x.jsonl"), source="s3://data/x.jsonl")


def test_instruction_format_takes_loss_on_the_response_only(tokenizer) -> None:
    config = Dataset(uri="s3://data/x.jsonl", format="instruction")
    [example] = tokenize_records(records({"prompt": "where is the cat?", "response": "on the mat."}), tokenizer, config)
    assert trained_text(tokenizer, example) == "on the mat.</s>"
    assert tokenizer.decode(example.input_ids) == "<s>where is the cat?on the mat.</s>"
    with pytest.raises(TrainerError, match="line 1: field 'response' is missing .*dataset.responseField"):
        tokenize_records(records({"prompt": "p"}), tokenizer, config)
    with pytest.raises(TrainerError, match="line 1: field 'prompt' is a int, not a string .*dataset.promptField"):
        tokenize_records(records({"prompt": 3, "response": "r"}), tokenizer, config)


def test_chat_format_renders_the_template_and_trains_on_assistant_messages_only(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "you answer sums in words."},
        {"role": "user", "content": "what is one plus one?"},
        {"role": "assistant", "content": "two."},
        {"role": "user", "content": "and two plus two?"},
        {"role": "assistant", "content": "four."},
    ]
    config = Dataset(uri="s3://data/x.jsonl", format="chat")
    [example] = tokenize_records(records({"messages": messages}), tokenizer, config)
    # The whole conversation is the template's rendering (tiny.py's template)...
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == (
        "<s><|system|>you answer sums in words.</s><|user|>what is one plus one?</s>"
        "<|assistant|>two.</s><|user|>and two plus two?</s><|assistant|>four.</s>"
    )
    # ...and only the replies with their end-of-turn token carry loss: not the system prompt,
    # the user turns, nor the <|assistant|> header the model is given at inference time.
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "two.</s>four.</s>"
    assert trained == tokenizer.encode("two.</s>", add_special_tokens=False) + tokenizer.encode(
        "four.</s>", add_special_tokens=False)
    with pytest.raises(TrainerError, match="line 1: field 'messages' must be a non-empty list"):
        tokenize_records(records({"messages": "hi"}), tokenizer, config)


def test_chat_reply_that_opens_the_conversation_is_trained_without_its_header(tokenizer) -> None:
    messages = [{"role": "assistant", "content": "hello, ask me a sum."}, {"role": "user", "content": "one plus one?"}]
    [example] = tokenize_records(records({"messages": messages}), tokenizer,
                                 Dataset(uri="s3://data/x.jsonl", format="chat"))
    assert trained_text(tokenizer, example) == "hello, ask me a sum.</s>"


def test_chat_format_without_a_chat_template_says_what_to_do(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")
    plain.chat_template = None
    with pytest.raises(TrainerError, match="tokenizer has no chat template.*chat_template"):
        tokenize_records(records({"messages": [{"role": "user", "content": "hi"}]}), plain,
                         Dataset(uri="s3://data/x.jsonl", format="chat"))


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tiny_assets: Path) -> None:
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")
    # Numbers each message by the conversation length: every new message changes the text before it.
    odd.chat_template = "{% for m in messages %}{{ messages|length }}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TrainerError, match="s3://data/x.jsonl line 1: the tokenizer's chat template does not render"):
        tokenize_records(records({"messages": messages}), odd, Dataset(uri="s3://data/x.jsonl", format="chat"),
                         source="s3://data/x.jsonl")


def test_overlong_examples_are_truncated_by_default_and_counted(tokenizer) -> None:
    examples = tokenize_records(records({"text": "the cat " * 100}, {"text": "a cat"}), tokenizer,
                                Dataset(uri="s3://data/x.jsonl"))
    kept, notes = fit_to_length(examples, 16, "truncate", source="s3://data/x.jsonl")
    assert [len(e.input_ids) for e in kept] == [16, len(examples[1].input_ids)]
    assert all(len(e.labels) == len(e.input_ids) for e in kept)
    assert notes == [("s3://data/x.jsonl: truncated 1 of 2 examples longer than 16 tokens to their first 16 "
                      "(dataset.overlong: truncate)")]


def test_overlong_drop_leaves_them_out_and_says_how_many() -> None:
    examples = [Example([1] * n, [1] * n) for n in [10, 600, 512, 513, 30]]
    kept, notes = fit_to_length(examples, 512, "drop", source="s3://data/x.jsonl")
    assert [len(e.input_ids) for e in kept] == [10, 512, 30]
    assert notes == ["s3://data/x.jsonl: dropped 2 of 5 examples longer than 512 tokens (dataset.overlong: drop)"]


def test_examples_truncated_before_their_response_are_dropped_and_counted(tokenizer) -> None:
    config = Dataset(uri="s3://data/x.jsonl", format="instruction")
    examples = tokenize_records(
        records({"prompt": "where is the cat? " * 20, "response": "on the mat."}, {"prompt": "p", "response": "r"}),
        tokenizer, config,
    )
    kept, notes = fit_to_length(examples, 16, "truncate", "instruction", source="s")
    assert len(kept) == 1 and trained_text(tokenizer, kept[0]) == "r</s>"
    assert notes[-1] == ("s: dropped 1 of 2 examples with no token to train on within 16 tokens "
                         "(format instruction trains on the response only)")


@pytest.mark.parametrize("overlong, fix", [("drop", "or set dataset.overlong: truncate"), ("truncate", "")])
def test_nothing_left_after_filtering_is_an_error_that_says_what_to_change(overlong: str, fix: str) -> None:
    # Under truncate, a long prompt leaves no response token; under drop the example goes.
    examples = [Example([1] * 40, [IGNORE_INDEX] * 39 + [1]) for _ in range(3)]
    with pytest.raises(TrainerError) as error:
        fit_to_length(examples, 32, overlong, "instruction", source="s3://data/x.jsonl")
    assert str(error.value).startswith("s3://data/x.jsonl: no example left to train on: of 3, 3 are longer than "
                                       f"training.sequenceLength (32, dataset.overlong: {overlong})")
    assert str(error.value).endswith("raise training.sequenceLength" + (f" {fix}" if fix else ""))


def test_collate_pads_right_and_masks_padding_from_the_loss() -> None:
    # No attention mask: right padding is invisible to a causal LM (test_loss.py proves it).
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_validation_split_is_seeded_and_disjoint() -> None:
    examples = [Example(list(range(n)), list(range(n))) for n in range(1, 41)]
    train, validation = split_train_validation(examples, 0.1, seed=3)
    assert len(validation) == 4 and len(train) == 36
    assert not {id(e) for e in train} & {id(e) for e in validation}
    assert split_train_validation(examples, 0.1, seed=3) == (train, validation)
    assert split_train_validation(examples, 0.0, seed=3) == (examples, [])


def test_validation_uri_is_a_separate_file_evaluated_whole(tmp_path: Path, tokenizer) -> None:
    train = write_lines(tmp_path / "train", [json.dumps({"text": f"the cat number {i}."}) for i in range(20)])
    held_out = write_lines(tmp_path / "validation", ['{"text": "the dog."}', '{"text": "the owl."}'])
    config = Dataset(uri="s3://data/train.jsonl", validation_uri="s3://data/val.jsonl")
    datasets = prepare_datasets(train, held_out, tokenizer, config, 64, seed=0)
    assert len(datasets.train) == 20
    assert [tokenizer.decode(e.input_ids[1:-1]) for e in datasets.validation] == ["the dog.", "the owl."]
    bad = write_lines(tmp_path / "bad", ['{"text": "ok"}', "{oops"])
    with pytest.raises(TrainerError, match="s3://data/val.jsonl line 2: not valid JSON"):
        prepare_datasets(train, bad, tokenizer, config, 64, seed=0)


def test_prepare_datasets_reports_overlong_examples_for_rank_0_to_log(tmp_path: Path, tokenizer) -> None:
    lines = [json.dumps({"text": "the cat " * (40 if i % 5 == 0 else 1)}) for i in range(500)]
    path = write_lines(tmp_path / "train", lines)
    config = Dataset(uri="s3://data/train.jsonl", overlong="drop", validation_split=0.1)
    datasets = prepare_datasets(path, None, tokenizer, config, 32, seed=0)
    assert datasets.notes == [("s3://data/train.jsonl: dropped 100 of 500 examples longer than 32 tokens "
                               "(dataset.overlong: drop)")]
    assert len(datasets.train) + len(datasets.validation) == 400 and len(datasets.validation) == 40


def test_demo_datasets_parse_in_their_formats(tiny_assets: Path, tokenizer) -> None:
    for name, fmt in [("train", "text"), ("chat", "chat"), ("instruction", "instruction")]:
        config = Dataset(uri="s3://data/x.jsonl", format=fmt)
        datasets = prepare_datasets(tiny_assets / "datasets" / f"{name}.jsonl", None, tokenizer, config, 512, seed=0)
        assert len(datasets.train) >= 200 and datasets.notes == []
        assert all(e.trained_tokens for e in datasets.train)
