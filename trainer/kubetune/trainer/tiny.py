"""Demo assets without any model hub: a tiny Llama, its tokenizer and learnable datasets.

``python -m kubetune.trainer.tiny --out DIR [--s3-endpoint URL]`` writes::

    DIR/tiny-llama/          config.json, model.safetensors, tokenizer files (with a chat template)
    DIR/datasets/train.jsonl     format text         ({"text": ...})
    DIR/datasets/chat.jsonl      format chat         ({"messages": [{role, content}, ...]})
    DIR/datasets/instruction.jsonl format instruction ({"prompt": ..., "response": ...})
    DIR/datasets/retention.jsonl   text for evaluation.retentionUri ({"text": ...})

and, with ``--s3-endpoint``, creates buckets ``models``, ``datasets``, ``adapters`` and uploads
``s3://models/tiny-llama/``, ``s3://datasets/quickstart/{train,chat,instruction,retention}.jsonl``
(credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, default "kubetune").

Everything is seeded: two runs write byte-identical model weights and datasets, in seconds.
The data is templated arithmetic and sentences, so even this model's loss drops quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

MODEL_NAME = "tiny-llama"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BUCKETS = ("models", "datasets", "adapters")

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]
_COLOURS = ["red", "blue", "green", "black", "white"]
_PLACES = ["mat", "roof", "hill", "tree", "boat"]
_CAPITALS = ["OSLO", "LIMA", "ROME", "KYIV", "DOHA", "BERN", "ACCRA", "QUITO"]


def make_examples(seed: int = 0, count: int = 240) -> dict[str, list[dict[str, Any]]]:
    """Records for the three dataset formats, deterministic for a given seed."""
    rng = random.Random(seed)
    text, chat, instruction = [], [], []
    for i in range(count):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        question = f"what is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?"
        answer = f"{_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
        animal, colour, place = rng.choice(_ANIMALS), rng.choice(_COLOURS), rng.choice(_PLACES)
        sentence = f"the {colour} {animal} sits on the {place}."
        text.append({"text": answer if i % 2 else sentence})
        chat.append(
            {
                "messages": [
                    {"role": "system", "content": "you answer sums in words."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
        instruction.append({"prompt": f"where does the {colour} {animal} sit?", "response": sentence})
    # Text for evaluation.retentionUri, from a generator of its own (the datasets above stay as
    # they were): capitals, digits and hyphens, none of which the demo uses (nor its spaces and
    # full stops). The random base model knows nothing, so this stands in for what a real one
    # knows: text whose tokens training on the demo makes less likely, so that the retention
    # loss rises.
    other = random.Random(seed + 1)
    retention = [{"text": "-".join(f"{other.choice(_CAPITALS)}-{other.randint(0, 999)}" for _ in range(4))}
                 for _ in range(count // 6)]
    return {"train": text, "chat": chat, "instruction": instruction, "retention": retention}


def build_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained on ``corpus``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_model(tokenizer: Any, seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden 64, 4 heads) sized to ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_demo_assets(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write model folder and datasets under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    examples = make_examples(seed)
    datasets_dir = out_dir / "datasets"
    datasets_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, records in examples.items():
        path = datasets_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
        paths[name] = path

    corpus = [r["text"] for r in examples["train"]]
    corpus += [m["content"] for r in examples["chat"] for m in r["messages"]]
    corpus += [r["prompt"] + " " + r["response"] for r in examples["instruction"]]
    tokenizer = build_tokenizer(corpus)
    model_dir = out_dir / MODEL_NAME
    build_model(tokenizer, seed).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    paths["model"] = model_dir
    return paths


def upload_demo_assets(
    endpoint: str | None,
    *,
    access_key: str,
    secret_key: str,
    region: str = "us-east-1",
    assets_dir: Path | None = None,
) -> dict[str, str]:
    """Create the demo buckets and upload model + datasets; returns ``{name: s3 uri}``.

    Builds the assets in a temporary folder unless ``assets_dir`` already holds them.
    """
    from kubetune.api.spec import Storage
    from kubetune.trainer.s3 import make_client

    client = make_client(Storage(endpoint=endpoint, region=region),
                         access_key=access_key, secret_key=secret_key)
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)

    with tempfile.TemporaryDirectory(prefix="kubetune-demo-") as scratch:
        root = Path(assets_dir) if assets_dir else Path(scratch)
        if not (root / MODEL_NAME / "config.json").is_file():
            write_demo_assets(root)
        for path in sorted((root / MODEL_NAME).rglob("*")):
            if path.is_file():
                key = f"{MODEL_NAME}/{path.relative_to(root / MODEL_NAME).as_posix()}"
                client.upload_file(str(path), "models", key)
        uris = {"model": f"s3://models/{MODEL_NAME}/"}
        for name in ("train", "chat", "instruction", "retention"):
            client.upload_file(str(root / "datasets" / f"{name}.jsonl"), "datasets", f"quickstart/{name}.jsonl")
            uris[name] = f"s3://datasets/quickstart/{name}.jsonl"
    return uris


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune.trainer.tiny",
        description="Write the tiny demo model and datasets; optionally upload them to S3.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write the assets into")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL to upload to (e.g. http://127.0.0.1:9000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    args = parser.parse_args(argv)
    paths = write_demo_assets(args.out, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.s3_endpoint:
        uris = upload_demo_assets(
            args.s3_endpoint,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID", "kubetune"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "kubetune"),
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            assets_dir=args.out,
        )
        for name, uri in uris.items():
            print(f"uploaded {name}: {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
