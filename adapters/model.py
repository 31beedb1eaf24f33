"""Is a folder an mlx-lm model that can load? The daemon asks before it starts a job.

Cheap on purpose: it reads config.json, the shard index and each weight file's header, never
the weights. What it checks mirrors mlx_lm.load: config.json with a "model_type", weights in
model*.safetensors (the files it globs), and a tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ftctl.core.config import Config
from ftctl.core.fit import ModelFacts
from ftctl.core.retention import checkpoint_bytes

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on its JSON header
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# what mlx_lm fetches (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS): the snapshot must hold these to load
_ALLOW = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


class ModelNotFound(Exception):
    """The model a user named cannot be found (a one-line reason that says what to do)."""


@dataclass(frozen=True)
class Snapshot:
    """A Hugging Face repo id resolved in the local cache: the folder and its commit hash."""

    repo: str
    path: str
    revision: str


def is_repo_id(spec: str) -> bool:
    """``org/name`` that is not an existing path: what mlx_lm.load would look up on the hub."""
    return bool(_REPO_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def resolve_repo(repo: str) -> Snapshot:
    """Resolve ``repo`` the way mlx_lm.load does, from the local Hugging Face cache only (this
    machine never downloads): the snapshot refs/main points at. ModelNotFound if it is not cached."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    # read now: huggingface_hub reads them once, when first imported
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (
        str(Path(home) / "hub") if home else constants.HF_HUB_CACHE
    )
    try:
        path = Path(
            snapshot_download(repo, local_files_only=True, allow_patterns=_ALLOW, cache_dir=cache)
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ModelNotFound(
            f"{repo} is not in the local Hugging Face cache ({cache}) and ftctl never downloads. On a machine with "
            f"internet run `hf download {repo}` and copy its cache folder (models--{repo.replace('/', '--')}) into "
            f"{cache} (or point HF_HUB_CACHE at a copy), or pass a local mlx-lm model folder"
        ) from None
    except HFValidationError as e:
        raise ModelNotFound(
            f"{repo!r} is neither an existing path nor a valid Hugging Face repo id ({e})"
        ) from None
    return Snapshot(repo=repo, path=str(path), revision=path.name)


_LAYER = re.compile(r"^((?:.*\.)?(?:layers|h|blocks)\.)(\d+)\.(.+)$")
_LEAVES = ("weight", "bias", "scales", "biases")


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def _first(config: dict, keys) -> tuple[str | None, int | None]:
    for where in (config, config.get("text_config") or {}):
        for k in keys:
            v = where.get(k) if isinstance(where, dict) else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return k, v
    return None, None


def _header(f: Path) -> dict:
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        return json.loads(fh.read(n))


def shape(path) -> ModelFacts:
    """The model folder's ModelFacts (call model_problem first: this assumes the files are readable)."""
    p = Path(path)
    config = json.loads((p / "config.json").read_bytes())
    modules: dict[str, int] = {}
    for f in sorted(p.glob("model*.safetensors")):
        for name, t in _header(f).items():
            if name == "__metadata__" or "." not in name:
                continue
            module, leaf = name.rsplit(".", 1)
            if leaf in _LEAVES:
                dims = len(t.get("shape", ())) if leaf in ("weight", "scales") else 0
                modules[module] = max(modules.get(module, 0), dims)
    layer_modules: dict[str, int] = {}
    top: dict[str, int] = {}
    prefix, seen = "", set()
    for module, dims in modules.items():
        m = _LAYER.match(module + ".")
        if m and m.group(3).rstrip("."):
            prefix = prefix or m.group(1)
            seen.add(int(m.group(2)))
            rest = m.group(3).rstrip(".")
            layer_modules[rest] = max(layer_modules.get(rest, 0), dims)
        else:
            top[module] = dims
    _, layers = _first(config, _LAYER_KEYS)
    key, context = _first(config, _CONTEXT_KEYS)
    return ModelFacts(
        layers=layers if layers is not None else (max(seen) + 1 if seen else None),
        layer_prefix=prefix,
        layer_modules=layer_modules,
        top_modules=top,
        context=context,
        context_key=key,
    )


def safetensors_names(path) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file (its header only); ValueError if it is not one."""
    f = Path(path)
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{f} is not a safetensors file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
            return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{f} is not a safetensors file (its header is not valid)") from None


def model_problem(path) -> str | None:
    """None if `path` looks like an mlx-lm model folder that can load, else a one-line reason."""
    p = Path(path)
    try:
        return _folder(p) or _config(p) or _index(p) or _weights(p) or _tokenizer(p)
    except OSError as e:
        return f"cannot read {e.filename or p}: {e.strerror or e}"


def _folder(p: Path) -> str | None:
    if not p.exists():
        return f"{p} does not exist"
    if not p.is_dir():
        hint = (
            (
                " (a GGUF file: mlx_lm.load needs a folder; `ftctl init --model FILE.gguf` or "
                "`--set model=FILE.gguf` converts it into the workspace)"
            )
            if p.suffix.lower() == ".gguf"
            else ""
        )
        return f"{p} is a file, not a model folder{hint}"
    return None


def _config(p: Path) -> str | None:
    if not (p / "config.json").is_file():
        return (
            f"{p} has no config.json: not an mlx-lm model folder "
            "(it needs config.json, *.safetensors weights and a tokenizer)"
        )
    data, problem = _json(p / "config.json")
    if problem:
        return problem
    if not isinstance(data, dict):
        return f"config.json in {p} is not a JSON object"
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        return f'config.json in {p} has no "model_type" (mlx-lm picks the architecture by it)'
    return None


def _index(p: Path) -> str | None:
    if not (p / INDEX).exists():
        return None
    data, problem = _json(p / INDEX)
    if problem:
        return problem
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return f'{INDEX} in {p} has no "weight_map" object'
    shards = sorted(set(map(str, weight_map.values())))
    missing = [s for s in shards if not (p / s).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return (
            f"{p} lacks {len(missing)} of the {len(shards)} weight shards {INDEX} lists: "
            f"{', '.join(missing[:3])}{more} (an interrupted download or copy?)"
        )
    return None


def _weights(p: Path) -> str | None:
    files = sorted(p.glob("model*.safetensors"))
    if not files:
        others = sorted(f.name for f in p.glob("*.safetensors"))
        gguf = sorted(f.name for f in p.glob("*.gguf"))
        if others:
            return (
                f"{p} has *.safetensors files ({', '.join(others[:3])}) but none named model*.safetensors, "
                "the only ones mlx_lm.load reads (adapter weights are not a base model)"
            )
        if gguf:
            return (
                f"{p} has no *.safetensors weights, only GGUF ({gguf[0]}), which mlx_lm.load cannot read: "
                f"name the file itself (--model {p / gguf[0]}) and ftctl converts it"
            )
        return (
            f"{p} has no *.safetensors weights (convert a Hugging Face model with mlx_lm.convert)"
        )
    for f in files:
        problem = _safetensors_problem(f)
        if problem:
            return problem
    return None


def _safetensors_problem(f: Path) -> str | None:
    """Checks the header only: 8-byte length, JSON, and that the file is as long as it says."""
    size = f.stat().st_size
    if size == 0:
        return f"{f} is empty (an interrupted download or copy?)"
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            return f"{f} is truncated or not a safetensors file ({size} bytes)"
        try:
            header = json.loads(fh.read(n))
            end = max(
                (t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{f} is not a safetensors file (its header is not valid)"
    if 8 + n + end > size:
        return f"{f} is truncated: {size} bytes, its header says {8 + n + end} (an interrupted download or copy?)"
    return None


def quantized(path) -> bool:
    """Does the model's config.json say its weights are quantized (an mlx-community 4-bit folder, an
    imported GGUF kept quantized)?"""
    data, _ = _json(Path(path) / "config.json")
    return isinstance(data, dict) and bool(
        data.get("quantization") or data.get("quantization_config")
    )


def trained_bytes(path, num_layers: int) -> int:
    """Bytes of the weights a full fine-tune of the model at ``path`` trains: the tensors of its last
    ``num_layers`` transformer layers (-1: all), read from the safetensors headers (no weight is
    loaded). 0 when the files name no layers."""
    layers: dict[int, int] = {}
    for f in sorted(Path(path).glob("model*.safetensors")):
        for name, t in _header(f).items():
            m = _LAYER.match(name) if name != "__metadata__" else None
            if m:
                start, end = t["data_offsets"]
                layers[int(m.group(2))] = layers.get(int(m.group(2)), 0) + end - start
    chosen = sorted(layers)[-num_layers:] if num_layers > 0 else sorted(layers)
    return sum(layers[i] for i in chosen)


def checkpoint_estimate(cfg: Config) -> int:
    """Bytes of one checkpoint of a job that has none yet: a full fine-tune's trained layers (from
    the model's safetensors headers) and their optimizer state; 0 for an adapter (a few MB at most)."""
    if cfg.fine_tune_type != "full" or model_problem(cfg.model):
        return 0
    return checkpoint_bytes(cfg, trained_bytes(cfg.model, cfg.num_layers))


def _tokenizer(p: Path) -> str | None:
    present = [p / name for name in TOKENIZER_FILES if (p / name).is_file()]
    if not present:
        return f"{p} has no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]})"
    for f in present:
        if f.stat().st_size == 0:
            return f"{f.name} in {p} is empty (an interrupted download or copy?)"
    if (p / "tokenizer_config.json").is_file():
        return _json(p / "tokenizer_config.json")[1]
    return None


def _json(f: Path) -> tuple[object, str | None]:
    try:
        return json.loads(f.read_bytes()), None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        return None, f"{f.name} in {f.parent} is empty or not valid JSON ({e})"
