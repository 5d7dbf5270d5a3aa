"""The trainer benchmark's workloads: one model, one dataset, one set of hyperparameters that
every contender trains with, and one evaluation that scores them all.

``text`` (``Workload()``, the first one):

- Model: a config-built Llama-style causal LM, about 20M parameters, random weights (nothing
  can be downloaded here), with a byte-level BPE tokenizer trained on the data.
- Data: text examples with long-tailed lengths (log-normal, median ~110 tokens, clipped to
  16-510) written in a small artificial language with learnable structure: every noun has its
  own adjective and verb, and numbers count up. A LoRA on a random model can learn enough of
  it for the evaluation loss to fall by well over a nat.
- Tokens: ``bos + text + eos``, loss on every token after ``bos``: exactly kubetune's
  ``format: text``, so every contender trains on the same token sequences.

``chat`` (``Workload.realistic(vocab_size)``: what users fine-tune):

- A real-size vocabulary (128,256 entries as Llama 3's, or 32,000 as Llama 2's and Mistral's),
  so that the output layer and the loss weigh what they weigh in real models; a word-level
  tokenizer over as many generated words, Zipf-distributed, and a chat template.
- Conversations of 1 to 4 turns: the user names things, the assistant describes each with its
  adjective and verb (learnable), and the loss is on the assistant's replies only. Lengths from
  32 to 1,024 tokens, log-normal with a long tail.
- The tokens and labels of every contender come from kubetune's own reader (``examples``).

Everything is seeded; :func:`build` caches its output under the work folder.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WORKLOAD_VERSION = 3
LLAMA3_VOCABULARY, LLAMA2_VOCABULARY = 128_256, 32_000
CHAT_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@dataclass(frozen=True)
class Workload:
    format: str = "text"
    """text (loss on every token) or chat (loss on the assistant's replies)."""
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

    @property
    def name(self) -> str:
        return "text" if self.format == "text" else f"chat-{self.vocab_size // 1000}k"

    @property
    def sequence_length(self) -> int:
        """Longer examples are cut to it (chat conversations may overshoot their target a little)."""
        return 512 if self.format == "text" else self.max_tokens

    @classmethod
    def quick(cls) -> "Workload":
        """A few steps of everything: checks the harness, measures nothing worth reporting."""
        return cls(train_examples=128, eval_examples=16, hidden_size=128, layers=2, heads=4,
                   intermediate_size=256, vocab_size=2048)

    @classmethod
    def realistic(cls, vocab_size: int = LLAMA3_VOCABULARY) -> "Workload":
        """Chat data on a real-size vocabulary (module docstring): 128 conversations, about
        33,000 tokens, 8 optimizer steps. Fewer tokens than the text workload: the output layer
        of a 128k vocabulary makes each one several times as costly."""
        return cls(format="chat", train_examples=128, eval_examples=32, median_tokens=200, min_tokens=32,
                   max_tokens=1024, vocab_size=vocab_size, hidden_size=384, layers=4, heads=6,
                   intermediate_size=1024, micro_batch_size=4, global_batch_size=16)

    @classmethod
    def realistic_quick(cls) -> "Workload":
        return cls(format="chat", train_examples=32, eval_examples=8, median_tokens=120, min_tokens=32,
                   max_tokens=400, vocab_size=8000, hidden_size=128, layers=2, heads=4, intermediate_size=256,
                   micro_batch_size=4, global_batch_size=16)

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

    if workload.format == "chat":
        _build_chat(workload, paths)
        stamp.write_text(json.dumps(workload.to_json()))
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


def examples(workload: Workload, tokenizer: Any, path: Path) -> list[Any]:
    """Every example of ``path`` as kubetune's reader makes it (``Example``: token ids and
    labels, IGNORE_INDEX where no loss is taken), for every contender alike."""
    from kubetune.api.spec import Dataset
    from kubetune.trainer.data import fit_to_length, read_jsonl, tokenize_records

    dataset = Dataset(uri=f"s3://bench/{path.name}", format=workload.format)
    made = tokenize_records(read_jsonl(path), tokenizer, dataset, source=str(path))
    return fit_to_length(made, workload.sequence_length, "truncate", workload.format, source=str(path))[0]


def peak_memory_all_ranks() -> int:
    """The largest peak resident set of any rank (bytes), as kubetune's trainer reports it on a
    CPU: a collective, every rank calls it."""
    import resource

    import torch

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0], dtype=torch.float64)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return int(peak.item())


def evaluate(workload: Workload, model_dir: Path, adapter_dir: Path | None, eval_path: Path,
             batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss over the trained tokens of ``eval_path`` (every token
    after bos; the assistant's replies in a chat), for the base model with ``adapter_dir``
    applied; the same code scores every contender."""
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
    held_out = examples(workload, tokenizer, eval_path)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(held_out), batch_size):
            batch = held_out[start : start + batch_size]
            width = max(len(example.input_ids) for example in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
                labels[row, : len(example.labels)] = torch.tensor(example.labels)
                mask[row, : len(example.input_ids)] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = labels[:, 1:]
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


# ---- the chat workload --------------------------------------------------------------------


class _Vocabulary:
    """``size`` generated words (syllables), Zipf-distributed: most of a real vocabulary is
    rare. Nouns each have an adjective and a verb, which the assistant's replies use."""

    _SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh", "th", "qu"]

    def __init__(self, rng: random.Random, size: int) -> None:
        words: set[str] = set()
        while len(words) < size:
            words.add("".join(rng.choice(self._SYLLABLES) for _ in range(rng.randint(2, 5))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        adjectives, verbs = self.words[: size // 10], self.words[size // 10 : size // 5]
        self.nouns = self.words[size // 5 :]
        self.noun_weights = [1 / (i + 1) for i in range(len(self.nouns))]
        self.adjective_of = {n: adjectives[i % len(adjectives)] for i, n in enumerate(self.nouns)}
        self.verb_of = {n: verbs[(i * 7) % len(verbs)] for i, n in enumerate(self.nouns)}

    def nouns_for(self, rng: random.Random, count: int) -> list[str]:
        return rng.choices(self.nouns, self.noun_weights, k=count)


def _conversation(vocabulary: _Vocabulary, rng: random.Random, target_words: int) -> list[dict[str, str]]:
    """1 to 4 turns adding up to about ``target_words`` words: the user gives context (words
    the model cannot predict) and lists nouns, the assistant says ``the <adjective> <noun>
    <verb>.`` for each (learnable from the noun). About half the tokens are the assistant's."""
    turns = min(4, 1 + rng.randrange(4) if target_words > 60 else 1)
    messages = []
    for _ in range(turns):
        count = max(1, target_words // (10 * turns))
        nouns, context = vocabulary.nouns_for(rng, count), vocabulary.nouns_for(rng, 4 * count)
        messages.append({"role": "user", "content": " ".join(context) + " . describe " + " ".join(nouns) + " ."})
        messages.append({"role": "assistant", "content": " ".join(
            f"the {vocabulary.adjective_of[n]} {n} {vocabulary.verb_of[n]} ." for n in nouns)})
    return messages


def _build_chat(workload: Workload, paths: dict[str, Path]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(workload.seed)
    template_words = ["describe", "the", "."]
    vocabulary = _Vocabulary(rng, workload.vocab_size - len(CHAT_SPECIAL_TOKENS) - len(template_words))
    word_level = Tokenizer(models.WordLevel({word: i for i, word in enumerate(
        CHAT_SPECIAL_TOKENS + vocabulary.words + template_words)}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<pad>", model_max_length=workload.max_tokens,
                                        additional_special_tokens=CHAT_SPECIAL_TOKENS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == workload.vocab_size, len(tokenizer)
    conversations = []
    for _ in range(workload.train_examples + workload.eval_examples):
        conversations.append(_conversation(vocabulary, rng, _target_length(workload, rng)))
    lines = [json.dumps({"messages": c}) + "\n" for c in conversations]
    paths["train"].write_text("".join(lines[: workload.train_examples]))
    paths["eval"].write_text("".join(lines[workload.train_examples :]))
    _build_model(workload, tokenizer).save_pretrained(paths["model"], safe_serialization=True)
    tokenizer.save_pretrained(paths["model"])


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
        vocab_size=workload.vocab_size, hidden_size=workload.hidden_size,
        intermediate_size=workload.intermediate_size,
        num_hidden_layers=workload.layers, num_attention_heads=workload.heads, num_key_value_heads=workload.heads,
        max_position_embeddings=max(512, workload.max_tokens), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(workload.seed)
    return LlamaForCausalLM(config)
