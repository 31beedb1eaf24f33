"""Does a config fit its model and its data? What submit can know before anything loads (pure).

mlx-lm finds these out at load or at the first batch, as a traceback; submit refuses them with the
key, the value and what would fit: ``num_layers`` against the model's layers (-1 = all), LoRA
``keys`` against its module names, ``batch_size`` against the examples of each split, a
resume_adapter_file against the adapter this config makes. (``max_seq_length`` against the model's
context needs the tokenizer: control/submit.py's past_context.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MLX_LM_DEFAULTS, Config

__all__ = ["ModelFacts", "data_problems", "fitting_keys", "model_problems", "resume_problems"]

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # what mlx-lm's LoRA and DoRA layers train


@dataclass(frozen=True)
class ModelFacts:
    """A model as its config.json and its weight files' headers describe it (adapters/model.py)."""

    layers: int | None  # len(model.layers)
    layer_prefix: str  # a layer's modules are named <prefix><i>.<module> ("model.layers.")
    layer_modules: dict[str, int]  # module path inside a layer -> dimensions of its weight
    top_modules: dict[str, int]  # module paths outside the layers (lm_head, model.embed_tokens)
    context: int | None  # the context config.json states (None: it states none)
    context_key: str | None  # under which key


def fitting_keys(facts: ModelFacts) -> dict:
    """What `ftctl init` writes for the keys whose mlx-lm defaults a model may not fit: num_layers 16
    (a 2-layer model gets 2) and max_seq_length 2048 (a 512-token context gets 512)."""
    out = {}
    if facts.layers is not None:
        out["num_layers"] = min(MLX_LM_DEFAULTS["num_layers"], facts.layers)
    if facts.context is not None:
        out["max_seq_length"] = min(MLX_LM_DEFAULTS["max_seq_length"], facts.context)
    return out


def _listed(names, n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def adapted_layers(cfg: Config, facts: ModelFacts) -> range:
    n = facts.layers or 0
    return range(0 if cfg.num_layers == -1 else max(n - cfg.num_layers, 0), n)


def adapter_modules(cfg: Config, facts: ModelFacts) -> set[str]:
    """Module paths (inside a layer) the adapter adds LoRA to: the keys, or mlx-lm's default (every
    module with a 2-D or larger weight: linear, quantized linear, switch linear, embedding)."""
    keys = cfg.lora_parameters.keys
    if keys is not None:
        return set(keys)
    return {m for m, dims in facts.layer_modules.items() if dims >= 2}


def model_problems(cfg: Config, facts: ModelFacts) -> list[str]:
    out = []
    if facts.layers is not None and cfg.num_layers > facts.layers:
        out.append(
            f"num_layers = {cfg.num_layers}, but the model has {facts.layers} layers: set num_layers to "
            f"{facts.layers} or less, or -1 for all of them"
        )
    keys = cfg.lora_parameters.keys if cfg.fine_tune_type != "full" else None  # full: unused
    if keys is not None and facts.layer_modules:
        unknown = [k for k in keys if k not in facts.layer_modules and k not in facts.top_modules]
        if unknown:
            out.append(
                f"lora_parameters.keys names {_listed(unknown)}, which the model does not have; its "
                f"layers have {_listed(facts.layer_modules)}"
            )
        flat = [
            k
            for k in keys
            if k not in unknown and facts.layer_modules.get(k, facts.top_modules.get(k, 2)) < 2
        ]
        if flat:
            out.append(
                f"lora_parameters.keys names {_listed(flat)}, which cannot take LoRA (not a linear or "
                "embedding layer: a norm?)"
            )
    return out


def resume_problems(
    cfg: Config, facts: ModelFacts, tensors: dict[str, list[int]], name: str
) -> list[str]:
    """A resume_adapter_file's tensors against the adapter this config makes on this model."""
    if not tensors:
        return [f"resume_adapter_file {name} holds no tensors"]
    layers = set(adapted_layers(cfg, facts))
    if cfg.fine_tune_type == "full":  # the trained layers' own weights (mlx-lm's full adapter file)
        wrong = [
            t
            for t in tensors
            if t.rpartition(".")[2] in ADAPTER_LEAVES
            or not _in_layers(t.rpartition(".")[0], facts, layers, set(facts.layer_modules))
        ]
        if wrong:
            return [
                f"resume_adapter_file {name} holds {_listed(wrong, 3)}, not the weights of this "
                f"full fine-tune's layers (num_layers {cfg.num_layers}) on this model: was it trained "
                "with another model or config?"
            ]
        return []
    modules = adapter_modules(cfg, facts)
    top = set(cfg.lora_parameters.keys or ()) & set(facts.top_modules)
    wrong = []
    for t in tensors:
        module, _, leaf = t.rpartition(".")
        ok = leaf in ADAPTER_LEAVES and (
            module in top or _in_layers(module, facts, layers, modules)
        )
        if not ok:
            wrong.append(t)
    if wrong:
        return [
            f"resume_adapter_file {name} holds {_listed(wrong, 3)}, not adapter weights of this config "
            f"(fine_tune_type {cfg.fine_tune_type}, num_layers {cfg.num_layers}, lora_parameters.keys "
            f"{cfg.lora_parameters.keys}) on this model: was it trained with another model or config?"
        ]
    ranks = {s[-1] for t, s in tensors.items() if t.endswith(".lora_a") and s}
    if ranks and ranks != {cfg.lora_parameters.rank}:
        return [
            f"resume_adapter_file {name} has LoRA rank {_listed(map(str, ranks))}, this config "
            f"lora_parameters.rank = {cfg.lora_parameters.rank}"
        ]
    return []


def _in_layers(module: str, facts: ModelFacts, layers: set[int], modules: set[str]) -> bool:
    p = facts.layer_prefix
    if not p or not module.startswith(p):
        return False
    index, _, rest = module[len(p) :].partition(".")
    return index.isdigit() and int(index) in layers and rest in modules


def data_problems(cfg: Config, counts: dict[str, int]) -> list[str]:
    """``counts``: examples per split ("train", "valid", "test") the job will have."""
    out = []
    b = cfg.batch_size
    for split, what in (("train", "training"), ("valid", "validation"), ("test", "test")):
        n = counts.get(split)
        if n is not None and n < b:
            out.append(
                f"the {what} split has {n} example{'' if n == 1 else 's'}, fewer than batch_size = {b}: "
                f"lower batch_size to {max(n, 1)} or add {what} data"
            )
    return out
