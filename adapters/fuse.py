"""Fusing an adapter into its base model: a complete, verified model folder, written atomically.

A full fine-tune's "adapter" is the trained layers' own weights (mlx-lm's layout): there is nothing
to fuse. Its result *is* a model — the base with those weights in place — and it is promoted as
one: the same temp folder, manifest, verification (here: every trained tensor is in the saved
model bit for bit) and rename.

mlx-lm's own fuse logic (load with the adapter, ``.fuse()`` every LoRA module,
``mlx_lm.utils.save``) writes into ``models/.tmp-vNNNN-<pid>/``; every file is fsynced and
hashed into ``manifest.json``; the folder is then *verified* — it loads with ``mlx_lm.load``
and a forward pass is finite and matches base + adapter — before it is renamed to
``models/vNNNN/``. The caller commits ``base_promoted`` after that; only then may anything
old be removed.

A quantized base (an imported GGUF kept quantized, an mlx-community 4-bit folder: QLoRA) is
fused into a *dequantized* model, in the dtype of its quantization scales (mlx_lm.fuse
--dequantize): re-quantizing base + adapter moves every weight by up to half a quantization
step, which is far more than the adapter's own effect can be told apart from, so the check that
the fused model *is* base + adapter could not hold. The new base is about 16/bits times larger;
the next jobs train LoRA on it in float.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .faults import crash_point
from .fs import FS, sha256_file

MANIFEST = "manifest.json"
FORMAT = "ftctl-model"
PROBE = [1, 5, 9, 13, 17, 21, 25, 29]  # token ids for the verification forward pass


class FuseError(Exception):
    pass


class ModelCorrupt(Exception):
    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"fused model {path} is not usable: {reason}")


@dataclass(frozen=True)
class FusedModel:
    path: Path
    weights_sha256: str
    bytes: int
    max_abs_diff: float


def model_dir(models: Path, version: int) -> Path:
    return Path(models) / f"v{version:04d}"


def temp_dir(models: Path, version: int) -> Path:
    return Path(models) / f".tmp-v{version:04d}-{os.getpid()}"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fused_bytes(base: Path) -> int:
    """About how large the fused model of ``base`` is: as large, or 16/bits times for a quantized one."""
    size = folder_bytes(base)
    try:
        bits = (
            json.loads((Path(base) / "config.json").read_text()).get("quantization", {}).get("bits")
        )
    except (OSError, ValueError, AttributeError):
        bits = None
    return int(size * 16 / bits) if isinstance(bits, int) and bits > 0 else size


def weights_sha256(files: dict) -> str:
    """One sha256 over a model manifest's weight files (their sha256s, in name order)."""
    return hashlib.sha256(
        "".join(files[k]["sha256"] for k in sorted(files) if k.endswith(".safetensors")).encode()
    ).hexdigest()


def verify_model_dir(path: Path) -> str:
    """Check every file against the manifest; returns the weights sha256 or raises ModelCorrupt."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelCorrupt(path, f"{MANIFEST} missing or unreadable ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise ModelCorrupt(path, f"{name} is missing")
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise ModelCorrupt(path, f"{name} does not match its sha256")
    return weights_sha256(files)


def fine_tune_type(adapter: Path) -> str:
    """The adapter folder's fine_tune_type (adapter_config.json, as mlx-lm reads it; lora if unsaid)."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get(
            "fine_tune_type", "lora"
        )
    except (OSError, ValueError, AttributeError):
        return "lora"


def _same_tensors(model, adapter: Path, mx) -> None:
    """A promoted full fine-tune holds every trained tensor of ``adapter`` as it is, bit for bit."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    trained = mx.load(str(Path(adapter) / "adapters.safetensors"))
    wrong = [
        k
        for k, v in trained.items()
        if k not in params
        or params[k].dtype != v.dtype
        or not bool(mx.array_equal(params[k], v).item())
    ]
    if wrong:
        raise FuseError(
            f"the promoted model does not hold {len(wrong)} of the {len(trained)} trained tensors "
            f"as trained (e.g. {wrong[0]})"
        )


def _logits(model, mx):
    out = model(mx.array([PROBE]))
    mx.eval(out)
    return out.astype(mx.float32)


def fuse(base: Path, adapter: Path, models: Path, version: int, fs: FS | None = None) -> FusedModel:
    """Build, verify and rename into place ``models/vNNNN``. On any failure the temp folder
    is removed and the exception propagates; the base and the adapter are only read."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model, save

    fs = fs or FS()
    tmp, final = temp_dir(models, version), model_dir(models, version)
    if final.exists():
        raise FuseError(f"{final} already exists; recovery decides what it is, not fuse")
    try:
        model, tokenizer, config = load(str(base), adapter_path=str(adapter), return_config=True)
        expected = _logits(model, mx)
        quantized = "quantization" in config
        full = fine_tune_type(adapter) == "full"
        if not full:  # a full fine-tune's weights are loaded in place: nothing to fuse
            fused = [
                (n, m.fuse(dequantize=quantized))
                for n, m in model.named_modules()
                if hasattr(m, "fuse")
            ]
            if not fused:
                raise FuseError(f"{adapter} holds no LoRA/DoRA layers to fuse")
            model.update_modules(tree_unflatten(fused))
        # the layers without an adapter too: one float model (see the module docstring)
        if quantized:
            model = dequantize_model(model)
            config = {
                k: v for k, v in config.items() if k not in ("quantization", "quantization_config")
            }
        crash_point("consolidate_mid_fuse", version)
        save(tmp, str(base), model, tokenizer, config, donate_model=False)
        crash_point("consolidate_mid_write", version)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "format": FORMAT,
            "version": version,
            "base": str(base),
            "adapter": str(adapter),
            "files": files,
        }
        fs.write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fs.fsync_dir(tmp)
        del model
        check, _ = load(str(tmp))
        if full:
            _same_tensors(check, adapter, mx)
        got = _logits(check, mx)
        if not bool(mx.all(mx.isfinite(got)).item()):
            raise FuseError("the fused model's forward pass is not finite")
        diff = float(mx.max(mx.abs(got - expected)).item())
        scale = max(float(mx.max(mx.abs(expected)).item()), 1.0)
        if diff > 1e-3 * scale:
            raise FuseError(
                f"the fused model differs from base + adapter by {diff:.3g} (tolerance {1e-3 * scale:.3g})"
            )
        fs.rename(tmp, final)
        fs.fsync_dir(models)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    crash_point("consolidate_after_rename", version)
    return FusedModel(
        path=final,
        weights_sha256=weights_sha256(files),
        bytes=folder_bytes(final),
        max_abs_diff=diff,
    )
