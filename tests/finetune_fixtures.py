"""Small fine-tuning tasks and a tiny model built in the test (nothing downloaded): for the fine-tuning tests.

Synthetic records with rules a small model learns in a few steps: words of three topics (sports, music,
food) among common words. Task folders in ``train.demo_tasks``'s format (``train/validation/test.jsonl``,
``labels.txt``); a tiny masked-LM Longformer (hidden 32, 2 layers, window 8) saved as an HF directory with a
byte-level BPE trained on the same words, and a layout of 64 tokens in blocks of 16.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import longformer_jax as lj
from train import data as data_lib

TOPICS = {
    "sports": "ball goal team match player score coach field".split(),
    "music": "song guitar band note rhythm melody drum piano".split(),
    "food": "bread cheese soup apple sugar salt butter rice".split(),
}
COMMON = "the a of and to is in with it on was for".split()
LABELS = list(TOPICS)
SEQ_LEN, BLOCK = 64, 16
TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    attention_window=8,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    max_position_embeddings=SEQ_LEN + 2,
)
KEYS = "red blue green gold black white pink grey".split()


def sentence(rng: random.Random, topic: str, n: int = 6) -> str:
    words = [rng.choice(TOPICS[topic]) if i % 2 == 0 else rng.choice(COMMON) for i in range(n)]
    return " ".join(words).capitalize() + "."


def _records(task: str, rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        topic = LABELS[i % 3]
        other = LABELS[(i + 1) % 3]
        if task == "document-classification":
            out.append(
                {
                    "id": f"d{i}",
                    "text": " ".join(sentence(rng, topic) for _ in range(rng.randint(3, 9))),
                    "label": topic,
                }
            )
        elif task == "multi-label":
            topics = [topic] + ([other] if i % 2 else [])
            text = " ".join(sentence(rng, t) for t in topics for _ in range(3))
            out.append({"id": f"m{i}", "text": text, "labels": topics})
        elif task == "sequential-sentence-classification":
            counts = [rng.randint(0, 3) for _ in LABELS]  # sections in order, as a page's: sports, music, food
            labels = [t for t, c in zip(LABELS, counts) for _ in range(c)] or [topic]
            out.append({"id": f"s{i}", "text": [sentence(rng, t, 4) for t in labels], "labels": labels})
        elif task == "multiple-choice":
            context = f"{sentence(rng, topic)} {sentence(rng, topic)} <mask> {sentence(rng, topic)}"
            choices = [sentence(rng, t, 4) for t in (topic, other, LABELS[(i + 2) % 3])]
            k = rng.randrange(3)
            choices[0], choices[k] = choices[k], choices[0]
            out.append({"id": f"c{i}", "text": context, "choices": choices, "label": k})
        elif task == "question-answering":
            keys = rng.sample(KEYS, 4)
            values = [rng.choice(TOPICS[topic]) for _ in keys]
            context = " ".join(f"The {k} one is {v}." for k, v in zip(keys, values))
            q = rng.randrange(4)
            start = context.index(f"The {keys[q]} one is ") + len(f"The {keys[q]} one is ")
            out.append(
                {
                    "id": f"q{i}",
                    "question": f"Which is the {keys[q]} one?",
                    "context": context,
                    "answers": {"text": [values[q]], "answer_start": [start]},
                }
            )
        elif task == "token-classification":
            words = [w for _ in range(3) for w in sentence(rng, rng.choice(LABELS)).rstrip(".").split()]
            tags = [next((t for t in LABELS if w.lower() in TOPICS[t]), "O") for w in words]
            out.append({"id": f"t{i}", "text": words, "labels": tags})
    return out


def write_task(root: Path, task: str, n_train: int = 24, n_eval: int = 9, seed: int = 0) -> Path:
    """A task folder: train/validation/test.jsonl (+ labels.txt for labelled tasks)."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}:{seed}")
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = _records(task, rng, n)
        for r in rows:
            r["id"] = f"{split}-{r['id']}"
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if task in ("document-classification", "multi-label", "sequential-sentence-classification"):
        (folder / "labels.txt").write_text("".join(t + "\n" for t in LABELS))
    elif task == "token-classification":
        (folder / "labels.txt").write_text("".join(t + "\n" for t in ["O", *LABELS]))
    return folder


def build_base_model(root: Path) -> Path:
    """A tiny random masked-LM Longformer with a BPE trained on the synthetic words, as an HF directory."""
    rng = random.Random(0)
    texts = [sentence(rng, t) for t in LABELS for _ in range(60)] + [
        f"The {k} one is. Which is the {k} one?" for k in KEYS
    ]
    tok = data_lib.train_demo_tokenizer(
        texts, str(root / "tokenizer"), vocab_size=300, min_frequency=1, model_max_length=SEQ_LEN
    )
    config = lj.LongformerConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        sep_token_id=tok.sep_token_id,
        **TINY_MODEL,
    )
    model = lj.LongformerForMaskedLM(config)
    out = root / "base"
    lj.save_pretrained(out, model, lj.init_params(model, 0), tok)
    return out


def finetune_args(task: str, folder: Path, init: Path, out: Path, *extra: str) -> list[str]:
    """The command line of a quick run (24 steps, evaluation every 12, lr 1e-2)."""
    real = "document-classification" if task == "multi-label" else task
    args = [
        "--preset",
        "demo",
        "--task",
        real,
        "--init",
        str(init),
        "--data",
        str(folder),
        "--output-dir",
        str(out),
        "--seq-len",
        str(SEQ_LEN),
        "--block-size",
        str(BLOCK),
        "--batch-size",
        "4",
        "--max-steps",
        "24",
        "--eval-every",
        "12",
        "--learning-rate",
        "1e-2",
        "--warmup-fraction",
        "0",
        "--log-every",
        "1",
        "--no-progress-bar",
        "--no-async-checkpointing",
        "--no-dropout",
    ]
    if task == "multi-label":
        args += ["--multi-label"]
    return args + list(extra)
