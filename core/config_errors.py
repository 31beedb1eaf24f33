"""A config's errors, built from its schema (core/config.py's msgspec Structs and their Meta), never
parsed out of msgspec's English: ``prepare`` reads the user's mapping against the type info (unknown
keys with a "did you mean", floats written as '1e-5'), ``check`` walks it the way msgspec.convert
will (required keys, types, literals, bounds, lengths) and returns the first problem as a one-line
``ConfigError`` naming the dotted key, the value and what is allowed. msgspec's own error, if it still
finds one the walk did not (tests/test_config.py checks that it does not), is passed on as it is.
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any

from msgspec import inspect as mi

from ftctl.events.errors import UserError


class ConfigError(UserError, ValueError):
    """A config the user must fix. str() is one line; key is the dotted path of the culprit."""

    def __init__(
        self,
        message: str,
        *,
        key: str = "",
        value: Any = None,
        allowed: str = "",
        do: str = "",
        kept: str | None = None,
    ):
        super().__init__(message, kept=kept, do=do)
        self.key = key
        self.value = value
        self.allowed = allowed


# ---------------------------------------------------------------------------------------------
# type-info helpers (the schema above is the only place rules are written)

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def unwrap(t: Any) -> tuple[Any, str, str]:
    """(type without Meta, the 'allowed' text from Meta.extra, the description)."""
    allowed, desc = "", ""
    while isinstance(t, mi.Metadata):
        if t.extra and not allowed:
            allowed = t.extra.get("allowed", "")
        if t.extra_json_schema and not desc:
            desc = t.extra_json_schema.get("description", "")
        t = t.type
    return t, allowed, desc


def bounds(t: Any) -> str:
    if t.ge is not None and t.le is not None:
        return f" between {t.ge} and {t.le}"
    parts = []
    if t.ge is not None or t.gt is not None:
        parts.append(f">= {t.ge}" if t.ge is not None else f"> {t.gt}")
    if t.le is not None or t.lt is not None:
        parts.append(f"<= {t.le}" if t.le is not None else f"< {t.lt}")
    return " " + " and ".join(parts) if parts else ""


def allowed(t: Any) -> str:
    """Human text for the values a type accepts."""
    t, said, _ = unwrap(t)
    if said:
        return said
    if isinstance(t, mi.IntType):
        return f"an integer{bounds(t)}"
    if isinstance(t, mi.FloatType):
        return f"a number{bounds(t)}"
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.StrType):
        return "a string"
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, mi.StructType):
        return "a mapping with keys " + ", ".join(f.name for f in t.fields)
    if isinstance(t, mi.DictType):
        return "a mapping"
    if isinstance(t, mi.ListType):
        return f"a list of {plural(allowed(t.item_type))}"
    if isinstance(t, mi.UnionType):
        kinds = {type(unwrap(m)[0]) for m in t.types}
        if kinds == {mi.IntType, mi.FloatType}:
            return "a number"
        parts = [allowed(m) for m in t.types if not isinstance(m, mi.NoneType)]
        text = " or ".join(parts)
        return text + (" or null" if len(parts) < len(t.types) else "")
    if isinstance(t, mi.NoneType):
        return "null"
    return "a value"


def plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text.startswith(one):
            return many + text[len(one) :]
    return text


def struct_member(t: Any) -> Any:
    """The Struct type inside t (unwrapping Meta and `| None`), or None."""
    t, _, _ = unwrap(t)
    if isinstance(t, mi.UnionType):
        for m in t.types:
            m, _, _ = unwrap(m)
            if isinstance(m, mi.StructType):
                return m
        return None
    return t if isinstance(t, mi.StructType) else None


def takes_float(t: Any) -> bool:
    t, _, _ = unwrap(t)
    if isinstance(t, mi.FloatType):
        return True
    if isinstance(t, mi.UnionType):
        kinds = [unwrap(m)[0] for m in t.types]
        return any(isinstance(k, mi.FloatType) for k in kinds) and not any(
            isinstance(k, mi.StrType) for k in kinds
        )
    return False


def list_item(t: Any) -> Any:
    t, _, _ = unwrap(t)
    if isinstance(t, mi.UnionType):
        for m in t.types:
            m, _, _ = unwrap(m)
            if isinstance(m, mi.ListType):
                return m.item_type
        return None
    return t.item_type if isinstance(t, mi.ListType) else None


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def show(value: Any) -> str:
    """A short one-line rendering of a user value."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    else:
        try:
            text = repr(value)
        except Exception:  # a value whose repr fails must not hide the real error
            text = f"<{type(value).__name__}>"
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def prepare(value: Any, t: Any, path: str, source: str) -> Any:
    """Copy the user's mapping, rejecting unknown/non-string keys and reading '1e-5'-style
    strings (PyYAML's YAML 1.1 resolver leaves them as str) as floats where a float goes."""
    st = struct_member(t)
    if st is not None and isinstance(value, dict):
        fields = {f.name: f for f in st.fields}
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"{source}: key {show(k)} in {path or 'the top level'} is not a name; "
                    f"keys are names such as {next(iter(fields))!r}",
                    key=join(path, str(k)),
                    value=v,
                    allowed=", ".join(fields),
                )
            if k not in fields:
                raise unknown_key(source, path, k, v, list(fields))
            out[k] = prepare(v, fields[k].type, join(path, k), source)
        return out
    item = list_item(t)
    if item is not None and isinstance(value, list):
        return [prepare(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, str) and takes_float(t) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return copy.deepcopy(value)


# mlx-lm-lora's keys that ftctl does not read: refused by name (a silently ignored key would train
# another run than the user's), with what to do instead
_OTHER_MODES = "ftctl trains train_mode sft, dpo and orpo only"
MLX_LM_LORA_UNSUPPORTED: dict[str, str] = {
    "train_type": "ftctl's name for it is mlx-lm's fine_tune_type (lora, dora, full)",
    "gradient_accumulation_steps": "ftctl's name for it is mlx-lm's grad_accumulation_steps",
    "sft_loss_type": "ftctl's SFT loss is mlx-lm's (nll); remove the key",
    "load_in_4bits": "quantize the model first (mlx_lm.convert -q) and train on that",
    "load_in_6bits": "quantize the model first (mlx_lm.convert -q) and train on that",
    "load_in_8bits": "quantize the model first (mlx_lm.convert -q) and train on that",
    "load_in_mxfp4": "quantize the model first (mlx_lm.convert -q) and train on that",
    "efficient_long_context": "use grad_checkpoint and max_seq_length instead",
    "recurrence_chunk_size": "not needed: remove the key",
    "fuse": "fuse after training with `ftctl consolidate` or mlx_lm.fuse",
    "lm_studio_name": "fuse with mlx_lm.fuse and import the folder into LM Studio",
    "reward_scaling": "mlx-lm-lora does not use it either (its help: not implemented)",
    "preference_score_feature": "ORPO here weighs every pair alike; remove the key",
    "qat_enable": "quantization-aware training is not supported",
    "qat_bits": "quantization-aware training is not supported",
    "qat_group_size": "quantization-aware training is not supported",
    "qat_mode": "quantization-aware training is not supported",
    "qat_start_step": "quantization-aware training is not supported",
    "qat_interval": "quantization-aware training is not supported",
    "wandb": "use mlx-lm's report_to: wandb",
    **dict.fromkeys(
        (
            "lambda_mse_target",
            "tau_mse_target",
            "lambda_mse",
            "clip_epsilon_logits",
            "judge",
            "judge_config",
            "alpha",
            "group_size",
            "epsilon",
            "epsilon_high",
            "max_completion_length",
            "temperature",
            "reward_weights",
            "reward_functions",
            "reward_functions_file",
            "grpo_loss_type",
            "importance_sampling_level",
            "type_feature",
            "answer_feature",
        ),
        _OTHER_MODES + " (this key belongs to another: ftpo, grpo, online_dpo, xpo, ppo, rlhf)",
    ),
}
PREFERENCE_KEYS = (
    "train_mode: sft | dpo | orpo, beta, dpo_cpo_loss_type: sigmoid | hinge | ipo | dpop, delta, "
    "reference_model_path, chosen_feature, rejected_feature, system_feature"
)


def unknown_key(source: str, path: str, key: str, value: Any, known: list[str]) -> ConfigError:
    dotted = join(path, key)
    if not path and key in MLX_LM_LORA_UNSUPPORTED:
        return ConfigError(
            f"{source}: {key!r} is an mlx-lm-lora key ftctl does not support "
            f"({MLX_LM_LORA_UNSUPPORTED[key]}). Of mlx-lm-lora's keys ftctl reads {PREFERENCE_KEYS} "
            "(docs/mlx-lm.md)",
            key=dotted,
            value=value,
            allowed=PREFERENCE_KEYS,
        )
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {join(path, close[0])!r}?"
    else:
        hint = "known keys" + (f" in {path}" if path else "") + ": " + ", ".join(known)
    return ConfigError(
        f"{source}: unknown key {dotted!r} ({hint})",
        key=dotted,
        value=value,
        allowed="one of " + ", ".join(known),
    )


# ---------------------------------------------------------------------------------------------
# the walk: what msgspec.convert will find, found first, in the schema's own terms


def check(value: Any, t: Any, path: str, source: str) -> ConfigError | None:
    """The first way ``value`` does not fit type info ``t`` (at dotted ``path``), or None."""
    inner = unwrap(t)[0]
    members = inner.types if isinstance(inner, mi.UnionType) else (inner,)
    members = [unwrap(m)[0] for m in members]
    kind = "type"
    for m in members:
        if isinstance(m, mi.StructType) and isinstance(value, dict):
            return _struct(value, m, path, source)
        if isinstance(m, (mi.DictType, mi.ListType)) and isinstance(
            value, dict if isinstance(m, mi.DictType) else (list, tuple)
        ):
            return _container(value, m, t, path, source)
        found = _leaf(value, m)
        if found is None:
            return None
        if found != "type":
            kind = found  # the value is of this member's kind but breaks its rule
    return _problem(kind, value, t, path, source)


_VERB = {
    "type": "has the wrong type: expected",
    "enum": "is not allowed: must be",
    "range": "is out of range: must be",
    "invalid": "is not valid: must be",
}


def _problem(kind: str, value: Any, t: Any, path: str, source: str) -> ConfigError:
    what = allowed(t)
    return ConfigError(
        f"{source}: {path or 'the top level'} = {show(value)} {_VERB[kind]} {what}",
        key=path,
        value=value,
        allowed=what,
    )


def _leaf(value: Any, m: Any) -> str | None:
    """None if ``value`` is a valid ``m`` (a scalar type), else "type", "enum", "range" or "invalid"."""
    if isinstance(m, mi.AnyType):
        return None
    if isinstance(m, mi.NoneType):
        return None if value is None else "type"
    if isinstance(m, mi.BoolType):
        return None if isinstance(value, bool) else "type"
    if isinstance(m, mi.IntType):
        if not isinstance(value, int) or isinstance(value, bool):
            return "type"
        return _number(value, m)
    if isinstance(m, mi.FloatType):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "type"
        return _number(value, m)
    if isinstance(m, mi.StrType):
        if not isinstance(value, str):
            return "type"
        if (m.min_length is not None and len(value) < m.min_length) or (
            m.max_length is not None and len(value) > m.max_length
        ):
            return "invalid"
        return "invalid" if m.pattern and not re.search(m.pattern, value) else None
    if isinstance(m, mi.LiteralType):
        if value in m.values and type(value) in {type(v) for v in m.values}:
            return None
        return "enum" if isinstance(value, (str, int)) and not isinstance(value, bool) else "type"
    return "type"  # a container type given a scalar (containers are walked by check)


def _number(value: float, m: Any) -> str | None:
    """ "range" if ``value`` breaks a bound of ``m`` (NaN breaks every bound, as in msgspec)."""
    kept = (
        (m.ge is None or value >= m.ge)
        and (m.gt is None or value > m.gt)
        and (m.le is None or value <= m.le)
        and (m.lt is None or value < m.lt)
        and (m.multiple_of is None or value % m.multiple_of == 0)
    )
    return None if kept else "range"


def _struct(value: dict, st: Any, path: str, source: str) -> ConfigError | None:
    for f in st.fields:
        if f.name in value:
            problem = check(value[f.name], f.type, join(path, f.name), source)
            if problem is not None:
                return problem
        elif f.required:
            dotted, desc = join(path, f.name), unwrap(f.type)[2]
            return ConfigError(
                f"{source}: missing required key {dotted!r}" + (f" ({desc})" if desc else ""),
                key=dotted,
                value=None,
                allowed=allowed(f.type),
            )
    return None


def _container(value: Any, m: Any, t: Any, path: str, source: str) -> ConfigError | None:
    """A list's length and items (each named by its index), or a mapping's length, keys and values
    (named as the mapping: ``t``, the field's type, says what it takes)."""
    if (m.min_length is not None and len(value) < m.min_length) or (
        m.max_length is not None and len(value) > m.max_length
    ):
        return _problem("invalid", value, t, path, source)
    if isinstance(m, mi.ListType):
        for i, v in enumerate(value):
            problem = check(v, m.item_type, f"{path}[{i}]", source)
            if problem is not None:
                return problem
        return None
    for k, v in value.items():
        inner = None if not isinstance(k, str) else check(v, m.value_type, join(path, k), source)
        if not isinstance(k, str) or (inner is not None and inner.allowed == NAMES):
            return ConfigError(
                f"{source}: {path or 'the top level'} has a key that is not a string: keys must be "
                "names",
                key=path,
                value=value,
                allowed=NAMES,
            )
        if inner is not None:
            return _problem("type", value, t, path, source)
    return None


NAMES = "string keys"
