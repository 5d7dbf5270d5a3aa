"""Demo assets: deterministic, loadable, uploaded where the quickstart expects them."""

from __future__ import annotations

from pathlib import Path

from kubetune.trainer.tiny import write_demo_assets


def test_assets_are_byte_identical_across_runs(tiny_assets: Path, tmp_path: Path) -> None:
    write_demo_assets(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert Path("tiny-llama/model.safetensors") in produced and Path("datasets/chat.jsonl") in produced
    for relative in produced:
        assert (tmp_path / relative).read_bytes() == (tiny_assets / relative).read_bytes(), relative


def test_model_and_tokenizer_load_and_fit_together(tiny_assets: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "tiny-llama")
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_attention_heads) == (64, 2, 4)
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.chat_template
    ids = tokenizer("the red cat sits on the mat.", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_upload_creates_buckets_and_quickstart_objects(uploaded_assets: dict[str, str], s3_client) -> None:
    assert uploaded_assets["model"] == "s3://models/tiny-llama/"
    assert uploaded_assets["train"] == "s3://datasets/quickstart/train.jsonl"
    buckets = {b["Name"] for b in s3_client.list_buckets()["Buckets"]}
    assert {"models", "datasets", "adapters"} <= buckets
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="models", Prefix="tiny-llama/")["Contents"]}
    assert {"tiny-llama/config.json", "tiny-llama/model.safetensors", "tiny-llama/tokenizer.json"} <= keys
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="datasets")["Contents"]}
    assert {"quickstart/train.jsonl", "quickstart/chat.jsonl"} <= keys
