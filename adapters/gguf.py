"""Importing a GGUF file (llama.cpp, LM Studio, Ollama) as an mlx-lm model folder.

MLX reads GGUF itself (``mx.load(path, return_metadata=True)``): Q4_0, Q4_1 and Q8_0 tensors
arrive as MLX affine-quantized triples (weight, scales, biases; group size 32), which mlx-lm
loads as QuantizedLinear / QuantizedEmbedding layers — so the model is kept quantized (LoRA on
it is QLoRA), or dequantized to ``dtype`` on request. What this module adds:
  - llama.cpp's tensor names mapped to Hugging Face Llama names, and the rows of ``attn_q`` /
    ``attn_k`` un-permuted (llama.cpp permutes them for its RoPE layout; weight, scales and
    biases alike), so the folder is an HF-layout Llama with ``rope_traditional: false``;
  - config.json from the ``llama.*`` metadata;
  - the tokenizer (tokenizer.json + tokenizer_config.json) from the ``tokenizer.*`` metadata,
    built by transformers' own GGUF tokenizer converter (byte-level BPE, control tokens as
    special tokens), with the pre-tokenizer that ``tokenizer.ggml.pre`` names;
  - the folder written to a temp path, fsynced, hashed into manifest.json and *verified* (it
    loads with ``mlx_lm.load`` and greedy generation gives tokens from a finite forward pass)
    before it is renamed into place. The caller commits ``model_imported`` after that.

Supported: the Llama architecture (``general.architecture == "llama"``: SmolLM/SmolLM2, Llama 3.0,
and others llama.cpp writes as "llama") with a byte-level BPE tokenizer (``tokenizer.ggml.model ==
"gpt2"``), without RoPE scaling. Sentencepiece vocabularies (TinyLlama, Llama 2, Mistral GGUFs)
and other architectures are refused with a message that says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .fs import FS, sha256_file
from .fuse import weights_sha256

SUPPORTED = ("llama",)
FORMAT = "ftctl-imported-gguf"
MANIFEST = "manifest.json"
DTYPES = ("float16", "bfloat16", "float32")
PROBE = "The capital of France is"  # the verification's prompt: its greedy continuation is shown
GROUP_SIZE = 32  # every GGUF type MLX keeps quantized (Q4_0, Q4_1, Q8_0) has blocks of 32
# llama.cpp's general.file_type (enum llama_ftype), for the journal and messages
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# tokenizer.ggml.pre -> the pre-tokenizer of the model's own tokenizer.json (when transformers' table lacks it)
_GPT2 = "gpt2"


class GGUFError(Exception):
    """The GGUF file cannot be imported; nothing was written (a one-line reason)."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the file says about itself, read without converting anything."""

    path: Path
    architecture: str
    name: str
    quantization: str  # "Q4_1", "F16", ... (general.file_type)
    layers: int | None = None  # <arch>.block_count
    context: int | None = None  # <arch>.context_length (the import's max_position_embeddings)


@dataclass(frozen=True)
class Imported:
    path: Path
    source: Path
    source_sha256: str
    quantization: str
    dtype: str | None  # None: kept quantized as in the file
    weights_sha256: str
    bytes: int
    seconds: float
    sample: str  # the verification's greedy continuation of PROBE


def _meta(path: Path):
    import mlx.core as mx

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises ValueError / RuntimeError with its own words
        raise GGUFError(f"{path} cannot be read as GGUF ({e})") from None
    return weights, meta


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key)
    if v is None:
        return default
    return v.item() if hasattr(v, "item") else v


def name_of(path: Path) -> str:
    """The folder name an import gets: the file's stem, made filesystem-safe."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip("-.") or "model"


def inspect(path) -> GGUFInfo:
    """Read the metadata; GGUFError if it is not a GGUF MLX can read or not a supported architecture."""
    path = Path(path)
    _, meta = _meta(path)
    arch = str(_scalar(meta, "general.architecture", ""))
    if arch not in SUPPORTED:
        raise GGUFError(
            f"{path.name} is a {arch or 'unknown'!r} model; importing GGUF supports the Llama family "
            f"only (general.architecture {', '.join(map(repr, SUPPORTED))} with a byte-level BPE tokenizer: "
            "SmolLM/SmolLM2, Llama 3.0). Convert its Hugging Face release with mlx_lm.convert instead"
        )
    kind = _scalar(meta, "tokenizer.ggml.model")
    if kind != _GPT2:
        raise GGUFError(
            f"its tokenizer is {kind!r}; the GGUF import builds byte-level BPE tokenizers "
            "(tokenizer.ggml.model 'gpt2': SmolLM/SmolLM2, Llama 3.0) only, not sentencepiece ones "
            "(TinyLlama, Llama 2, Mistral). Convert its Hugging Face release with mlx_lm.convert instead"
        )
    ftype = _scalar(meta, "general.file_type")
    quant = FILE_TYPES.get(int(ftype), f"file_type {ftype}") if ftype is not None else "unknown"
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=str(_scalar(meta, "general.name", path.stem)),
        quantization=quant,
        layers=_int(_scalar(meta, f"{arch}.block_count")),
        context=_int(_scalar(meta, f"{arch}.context_length", 2048)),
    )


def _int(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- weights


def _unpermute(w, n_head: int):
    """Undo llama.cpp's ``permute`` of attn_q / attn_k rows (works on packed weights, scales and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    base, _, kind = name.rpartition(".")  # kind: weight | scales | biases
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _NAMES:
        return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}.{kind}"
    if base in _TOP:
        return f"{_TOP[base]}.{kind}"
    raise GGUFError(
        f"unexpected tensor {name!r} for a Llama model (rope scaling tensors such as rope_freqs, "
        "used by Llama 3.1+, are not supported)"
    )


def _weights(weights: dict, meta: dict, dtype: str | None) -> tuple[dict, dict | None]:
    """HF-named weights and the config's "quantization" entry (None when dequantized or unquantized)."""
    import mlx.core as mx

    heads, kv = (
        int(_scalar(meta, "llama.attention.head_count")),
        int(
            _scalar(
                meta, "llama.attention.head_count_kv", _scalar(meta, "llama.attention.head_count")
            )
        ),
    )
    out, bits_of = {}, {}
    for name, w in weights.items():
        if name.rsplit(".", 1)[0].endswith(("attn_q", "attn_k")):
            w = _unpermute(w, heads if ".attn_q." in name else kv)
        out[_hf_name(name)] = w
    for name in [n for n in out if n.endswith(".scales")]:
        layer = name[: -len(".scales")]
        w, s = out[f"{layer}.weight"], out[name]
        bits = w.shape[-1] * 32 // (s.shape[-1] * GROUP_SIZE)
        if dtype is not None:
            out[f"{layer}.weight"] = mx.dequantize(
                w, s, out.pop(f"{layer}.biases"), group_size=GROUP_SIZE, bits=bits
            )
            del out[name]
        else:
            bits_of[layer] = bits
    if dtype is not None:
        target = getattr(mx, dtype)
        out = {k: v.astype(target) for k, v in out.items()}
        return out, None
    if not bits_of:
        return out, None
    common = max(set(bits_of.values()), key=list(bits_of.values()).count)
    quant = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for (
        layer,
        b,
    ) in bits_of.items():  # a file mixing types (e.g. Q8_0 embeddings): per-layer entries
        if b != common:
            quant[layer] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return out, quant


def _config(meta: dict, weights: dict, quant: dict | None) -> dict:
    g = lambda k, d=None: _scalar(meta, f"llama.{k}", d)  # noqa: E731
    if g("rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in weights:
        raise GGUFError(
            "the model uses RoPE scaling (Llama 3.1+ style), which the GGUF import does not support yet"
        )
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "max_position_embeddings": int(g("context_length", 2048)),
        "vocab_size": int(g("vocab_size", weights["model.embed_tokens.weight"].shape[0])),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
    }
    if quant is not None:
        cfg["quantization"] = quant
        cfg["quantization_config"] = quant
    return {k: v for k, v in cfg.items() if v is not None}


# --------------------------------------------------------------------------- tokenizer


def _tokenizer(meta: dict, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json from the metadata, by transformers' GGUF converter."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    names = GGUF_TOKENIZER_MAPPING["tokenizer"]
    tdict = {}
    for key, name in names.items():
        v = meta.get(f"tokenizer.{key}")
        if v is None:
            continue
        if hasattr(v, "tolist"):
            v = v.tolist()
        tdict[name] = v
    try:
        backend, _ = convert_gguf_tokenizer("llama", tdict)
    except Exception as e:
        raise GGUFError(f"its tokenizer could not be built ({type(e).__name__}: {e})") from None
    pre = tdict.get("pre_tokenizer_type")
    if pre == "smollm":  # SmolLM's own tokenizer.json: each digit alone, then the GPT-2 regex
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    elif pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in (None, "default", "gpt2", "gpt-2"):
        raise GGUFError(
            f"its pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one the import knows; a tokenizer "
            "that splits text differently from training would silently degrade the model"
        )
    elif pre in GGUF_PRE_TOKENIZER_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokens = tdict["tokens"]
    special = {}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unk_token_id"),
        ("pad_token", "pad_token_id"),
    ):
        if tdict.get(key) is not None and 0 <= int(tdict[key]) < len(tokens):
            special[name] = tokens[int(tdict[key])]
    template = _scalar(meta, "tokenizer.chat_template")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **special)
    tok.add_bos_token = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    tok.save_pretrained(str(out))


# --------------------------------------------------------------------------- the import


def cpu_only() -> bool:
    """No Metal GPU: MLX's CPU quantized matmul is many times slower than a float matmul on OpenBLAS."""
    import mlx.core as mx

    return not mx.metal.is_available()


def _verify(folder: Path) -> str:
    """Load with mlx_lm.load and generate greedily; the continuation, or GGUFError."""
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(folder))
    ids = tok.encode(PROBE)
    out = []
    for _ in range(8):
        logits = model(mx.array([ids + out]))[0, -1].astype(mx.float32)
        if not bool(mx.all(mx.isfinite(logits)).item()):
            raise GGUFError("the converted model's forward pass is not finite")
        out.append(int(mx.argmax(logits).item()))
    return tok.decode(out)


def import_gguf(
    source,
    dest_root: Path,
    *,
    dtype: str | None = None,
    name: str | None = None,
    fs: FS | None = None,
) -> Imported:
    """Convert ``source`` into ``dest_root/NAME`` (temp folder, fsync, manifest, verify, rename).

    ``dtype`` None keeps the file's quantization; else the weights are dequantized to it.
    On any failure the temp folder is removed and nothing else is touched."""
    import mlx.core as mx

    fs = fs or FS()
    source = Path(source).resolve()
    if dtype is not None and dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tic = time.perf_counter()
    info = inspect(source)
    final = Path(dest_root) / (name or name_of(source) + (f"-{dtype}" if dtype else ""))
    if final.exists():
        raise GGUFError(f"{final} already exists; nothing was changed")
    tmp = Path(dest_root) / f".tmp-{final.name}-{os.getpid()}"
    Path(dest_root).mkdir(parents=True, exist_ok=True)
    try:
        raw, meta = _meta(source)
        weights, quant = _weights(raw, meta, dtype)
        config = _config(meta, weights, quant)
        del raw
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _tokenizer(meta, tmp)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        source_sha = sha256_file(source)
        manifest = {
            "format": FORMAT,
            "source": str(source),
            "source_sha256": source_sha,
            "quantization": info.quantization,
            "dtype": dtype,
            "files": files,
        }
        fs.write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fs.fsync_dir(tmp)
        sample = _verify(tmp)
        fs.rename(tmp, final)
        fs.fsync_dir(Path(dest_root))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weights_sha = weights_sha256(files)
    return Imported(
        path=final,
        source=source,
        source_sha256=source_sha,
        quantization=info.quantization,
        dtype=dtype,
        weights_sha256=weights_sha,
        bytes=sum(m["bytes"] for m in files.values()),
        seconds=time.perf_counter() - tic,
        sample=sample,
    )
