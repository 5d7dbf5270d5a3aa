"""The trainer benchmark's workload: one model, one dataset, one set of hyperparameters that
every contender trains with, and one evaluation that scores them all.

- Model: a config-built Llama-style causal LM, about 20M parameters, random weights (nothing
  can be downloaded here), with a byte-level BPE tokenizer trained on the data.
- Data: text examples with long-tailed lengths (log-normal, median ~110 tokens, clipped to
  16-510) written in a small artificial language with learnable structure: every noun has its
  own adjective and verb, and numbers count up. A LoRA on a random model can learn enough of
  it for the evaluation loss to fall by well over a nat.
- Tokens: ``bos + text + eos``, loss on every token after ``bos``: exactly kubetune's
  ``format: text``, so every contender trains on the same token sequences.

Everything is seeded; :func:`build` caches its output under the work folder.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORKLOAD_VERSION = 2


@dataclass(frozen=True)
class Workload:
    train_examples: int = 1024
    eval_examples: int = 96
    median_tokens: int = 110
    min_tokens: int = 16
    max_tokens: int = 510
    vocab_size: int = 8192
    hidden_size: int = 384
    layers: int = 8
    heads: int = 6
    intermediate_size: int = 1024
    # Shared hyperparameters (every contender gets these).
    micro_batch_size: int = 8
    global_batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seed: int = 7

    @classmethod
    def quick(cls) -> "Workload":
        """A few steps of everything: checks the harness, measures nothing worth reporting."""
        return cls(train_examples=128, eval_examples=16, hidden_size=128, layers=2, heads=4,
                   intermediate_size=256, vocab_size=2048)

    def to_json(self) -> dict[str, Any]:
        return {"version": WORKLOAD_VERSION, **asdict(self)}

    @classmethod
    def from_file(cls, path: Path) -> "Workload":
        """The workload the harness wrote for the contenders (``to_json``)."""
        spec = json.loads(Path(path).read_text())
        if spec.pop("version") != WORKLOAD_VERSION:
            raise ValueError(f"{path}: written by another version of the benchmark; run it again")
        return cls(**{**spec, "lora_targets": tuple(spec["lora_targets"])})


def build(workload: Workload, workdir: Path) -> dict[str, Path]:
    """Write ``model/`` (weights + tokenizer), ``train.jsonl`` and ``eval.jsonl`` once."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"model": workdir / "model", "train": workdir / "train.jsonl", "eval": workdir / "eval.jsonl"}
    stamp = workdir / "workload.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == workload.to_json():
        return paths

    rng = random.Random(workload.seed)
    language = _Language(rng)
    tokenizer = _train_tokenizer(language.corpus(rng, 20_000), workload.vocab_size)
    texts = [
        _document(language, tokenizer, rng, _target_length(workload, rng), workload.max_tokens)
        for _ in range(workload.train_examples + workload.eval_examples)
    ]
    paths["train"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[: workload.train_examples]))
    paths["eval"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[workload.train_examples :]))
    _build_model(workload, tokenizer).save_pretrained(paths["model"], safe_serialization=True)
    tokenizer.save_pretrained(paths["model"])
    stamp.write_text(json.dumps(workload.to_json()))
    return paths


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """kubetune's ``format: text`` tokens: bos + text + eos."""
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


def evaluate(model_dir: Path, adapter_dir: Path | None, eval_path: Path, batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss over ``eval_path`` (every token after bos), for the
    base model with ``adapter_dir`` applied; the same code scores every contender."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    sequences = [token_ids(tokenizer, t) for t in read_texts(eval_path)]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


# ---- the artificial language -------------------------------------------------------------


class _Language:
    """Nouns, adjectives and verbs made of syllables, with Zipf-distributed frequencies; every
    noun has a favourite adjective and verb, which is what a model can learn."""

    _SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh", "th", "qu"]
    _NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]

    def __init__(self, rng: random.Random) -> None:
        words = set()
        while len(words) < 2400:
            words.add("".join(rng.choice(self._SYLLABLES) for _ in range(rng.randint(1, 3))))
        words = sorted(words)
        rng.shuffle(words)
        self.nouns, self.adjectives, self.verbs = words[:1400], words[1400:1900], words[1900:]
        self.noun_weights = [1 / (i + 1) for i in range(len(self.nouns))]
        self.adjective_of = {n: rng.choice(self.adjectives) for n in self.nouns}
        self.verb_of = {n: rng.choice(self.verbs) for n in self.nouns}

    def sentence(self, rng: random.Random) -> str:
        if rng.random() < 0.15:
            start = rng.randrange(len(self._NUMBERS) - 4)
            return " ".join(self._NUMBERS[start : start + rng.randint(3, 5)]) + "."
        subject, thing = rng.choices(self.nouns, self.noun_weights, k=2)
        return f"the {self.adjective_of[subject]} {subject} {self.verb_of[subject]} the {thing}."

    def corpus(self, rng: random.Random, sentences: int) -> list[str]:
        return [self.sentence(rng) for _ in range(sentences)]


def _target_length(workload: Workload, rng: random.Random) -> int:
    length = math.exp(rng.gauss(math.log(workload.median_tokens), 0.75))
    return int(min(max(length, workload.min_tokens), workload.max_tokens))


def _document(language: _Language, tokenizer: Any, rng: random.Random, target: int, max_tokens: int) -> str:
    """Sentences until the document is at least ``target`` tokens long (bos and eos included),
    never over ``max_tokens``."""
    sentences, tokens = [], 2
    while tokens < target:
        sentence = language.sentence(rng)
        size = len(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if tokens + size > max_tokens and sentences:
            break
        sentences.append(sentence)
        tokens += size
    return " ".join(sentences)


def _train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=512)


def _build_model(workload: Workload, tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=workload.vocab_size, hidden_size=workload.hidden_size, intermediate_size=workload.intermediate_size,
        num_hidden_layers=workload.layers, num_attention_heads=workload.heads, num_key_value_heads=workload.heads,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(workload.seed)
    return LlamaForCausalLM(config)
