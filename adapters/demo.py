"""A tiny model and a learnable dataset, built offline in seconds.

The tokenizer is a byte-level BPE trained here on the demo corpus; the model is an
mlx-lm llama with random weights. mlx_lm.load(model_dir) loads it with the real
loading code, so `ftctl demo` and the tests exercise the same path as a real model.
Same seed, same bytes. Everything is written durably (fsynced, folders included): a power loss
right after `ftctl init --demo` does not leave empty model files behind.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ftctl.adapters import fs
from ftctl.adapters.workspace import creating, make_folder

SPECIAL = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYSTEM = "You are a careful calculator."


@dataclass
class DemoPaths:
    model_dir: Path
    data_dir: Path
    train: Path
    valid: Path
    formats: dict[str, Path]
    preference: dict[str, Path] | None = None  # train/valid preference pairs (DPO, ORPO)


def build_demo(
    dest: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab: int = 512,
    seed: int = 0,
) -> DemoPaths:
    dest = Path(dest)
    with creating(
        dest
    ) as made:  # on failure: a WorkspaceError, and what this call created is removed
        for d in (dest / "model", dest / "data" / "formats", dest / "data" / "preference"):
            make_folder(d, made)
        before = _files(dest)
        try:
            return _build(dest, hidden, layers, heads, vocab, seed)
        finally:
            made += sorted(_files(dest) - before)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


def _build(dest: Path, hidden: int, layers: int, heads: int, vocab: int, seed: int) -> DemoPaths:
    model_dir, data_dir = dest / "model", dest / "data"
    pairs = _qa_pairs(seed)
    train, valid = pairs[:200], pairs[200:240]
    paths = {
        "train": data_dir / "train.jsonl",
        "valid": data_dir / "valid.jsonl",
    }
    _write_jsonl(paths["train"], [_chat(q, a) for q, a in train])
    _write_jsonl(paths["valid"], [_chat(q, a) for q, a in valid])
    samples = pairs[240:260]
    formats = {
        "text": [{"text": f"Q: {q} A: {a}"} for q, a in samples],
        "completions": [{"prompt": q, "completion": a} for q, a in samples],
        "chat": [_chat(q, a) for q, a in samples],
        "conversations": [
            {
                "conversations": [
                    {"from": "system", "value": SYSTEM},
                    {"from": "user", "value": q},
                    {"from": "assistant", "value": a},
                ],
                "label": "desirable",
            }
            for q, a in samples
        ],
    }
    format_paths = {}
    for name, rows in formats.items():
        format_paths[name] = data_dir / "formats" / f"{name}.jsonl"
        _write_jsonl(format_paths[name], rows)

    preference = {}
    for name, part in (("train", train), ("valid", valid)):
        preference[name] = data_dir / "preference" / f"{name}.jsonl"
        _write_jsonl(preference[name], _preference_rows(part, seed))

    corpus = [f"{SYSTEM} {q} {a}" for q, a in pairs] + [r["text"] for r in formats["text"]]
    eos_id = _save_tokenizer(model_dir, corpus, vocab)
    _save_model(model_dir, hidden, layers, heads, vocab, seed, eos_id)
    return DemoPaths(model_dir, data_dir, paths["train"], paths["valid"], format_paths, preference)


def _qa_pairs(seed: int) -> list[tuple[str, str]]:
    """Single-digit arithmetic, shuffled: 300 distinct questions."""
    rng = random.Random(seed)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    pairs = [
        (f"What is {a} {op} {b}?", str(fn(a, b)))
        for op, fn in ops.items()
        for a in range(10)
        for b in range(10)
    ]
    rng.shuffle(pairs)
    return pairs


def _preference_rows(pairs: list[tuple[str, str]], seed: int) -> list[dict]:
    """Preference pairs for the demo: the chosen answer is the right result alone; the rejected one
    restates the question, then gives a result off by one. The rule (answer with the result, nothing
    else) is one the tiny model learns in a few DPO/ORPO steps and that holds on questions it never
    saw, so accuracy on the validation pairs rises; the arithmetic alone it cannot learn that fast."""
    rng = random.Random(seed + 1)
    return [
        {
            "system": SYSTEM,
            "prompt": q,
            "chosen": a,
            "rejected": f"{q} {int(a) + rng.choice((-1, 1))}",
        }
        for q, a in pairs
    ]


def _chat(q: str, a: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": q},
            {"role": "assistant", "content": a},
        ]
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    fs.write_durable(
        path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(), 0o666
    )


def _save_tokenizer(model_dir: Path, corpus: list[str], vocab: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(model_dir))
    for f in sorted(model_dir.iterdir()):  # transformers writes in place, without fsync
        if f.is_file():
            fs.fsync_path(f)
    fs.fsync_path(model_dir)
    return fast.convert_tokens_to_ids("<|end|>")


def _save_model(model_dir, hidden, layers, heads, vocab, seed, eos_id) -> None:
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": eos_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    ordered = {k: weights[k] for k in sorted(weights)}
    fs.replace_durably(
        model_dir / "model.safetensors",
        lambda f: mx.save_safetensors(f, ordered, metadata={"format": "mlx"}),
        0o666,
    )
    fs.write_durable(
        model_dir / "config.json",
        (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        0o666,
    )
