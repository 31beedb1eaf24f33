"""The JSONL training-data validator. Pure: works on the file's bytes, never raises for bad data.

Per-line formats, detected in mlx-lm's order (mlx_lm.tuner.datasets.create_dataset):
  {"prompt": str, "completion": str}                    -> "completions"
  {"messages": [{"role", "content"}, ...], "tools"?}    -> "chat"
  {"text": str}                                         -> "text"
and the old daemon's
  {"conversations": [{"from", "value"}, ...], "label"?} -> "conversations" (trained as chat)
The file's format is the format of its first valid line; a valid line of another format is bad,
because mlx-lm builds one dataset type per file. The keys may be renamed as mlx-lm's
prompt_feature, completion_feature, text_feature and chat_feature rename them (``Features``);
records come out under mlx-lm's default names either way.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import msgspec
from msgspec import Struct

__all__ = [
    "DataError",
    "DataReport",
    "Features",
    "LineProblem",
    "long_records",
    "valid_records",
    "validate_jsonl",
]

WARN_RATIO = 0.01  # more bad lines than this: verdict "warn"
REJECT_RATIO = 0.05  # more bad lines than this: verdict "reject"
SHOWN_PROBLEMS = 3  # problems quoted in a verdict reason

CHAT_ROLES = ("system", "user", "assistant", "tool")
CONVERSATION_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}
LABELS = ("desirable", "undesirable")


class Features(NamedTuple):
    """The keys a line's format is read from (mlx-lm's *_feature config keys)."""

    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    chat: str = "messages"
    chosen: str = "chosen"  # preference pairs (mlx-lm-lora's chosen/rejected/system_feature)
    rejected: str = "rejected"
    system: str = "system"

    def rename(self, obj: dict, pairs: tuple[tuple[str, str], ...]) -> dict:
        """``obj`` with the renamed keys under mlx-lm's default names (the other keys kept)."""
        if all(ours == default for ours, default in pairs):
            return obj
        out = {k: v for k, v in obj.items() if k not in {o for o, _ in pairs}}
        out.update({default: obj[ours] for ours, default in pairs})
        return out


DEFAULT = Features()


class DataError(ValueError):
    """Misuse of the validator (wrong argument type). Bad data never raises: it is reported."""


class LineProblem(Struct, kw_only=True):
    line: int  # 1-based line number in the file, blank lines included
    reason: str


class DataReport(Struct, kw_only=True):
    format: str | None
    lines: int  # non-blank lines examined
    valid: int
    problems: list[LineProblem]
    bad_ratio: float
    verdict: Literal["ok", "warn", "reject"]
    reasons: list[str]
    undesirable: int  # valid conversations rows labelled undesirable: kept out of training


class _Line(NamedTuple):
    number: int
    format: str | None
    record: dict | None  # normalized to an mlx-lm format; None when the line is bad
    reason: str | None  # None when the line is good
    undesirable: bool


def _nonblank(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Keys other chat schemas use for a message's role and text (ShareGPT, OpenAI-like exports, ...):
# a message that has one of them instead of role/content gets the renaming named.
ROLE_KEYS = ("from", "speaker", "author", "sender", "user_type", "type")
CONTENT_KEYS = ("value", "text", "message", "body", "utterance", "content_text")


def _keys(m: dict) -> str:
    names = [repr(k) for k in list(m)[:6]]
    return ", ".join(names) + (", ..." if len(m) > 6 else "") if names else "none"


def _missing(i: int, m: dict, key: str, field: str = "messages") -> str:
    """A message without ``key`` ('role' or 'content'): name the key, the keys it has, and the renaming
    when they look like another schema's."""
    alias = {"role": ROLE_KEYS, "content": CONTENT_KEYS}[key]
    other = "content" if key == "role" else "role"
    theirs = next((k for k in alias if k in m), None)
    text = f"{field}[{i}] has no '{key}' key (its keys: {_keys(m)})"
    if theirs is None:
        return text
    if "from" in m and "value" in m:
        return (
            f"{text}: these are ShareGPT turns — name the list 'conversations' instead of 'messages' "
            '(ftctl reads {"conversations": [{"from": "human"|"gpt"|..., "value": ...}]} as it is)'
        )
    pair = next((k for k in {"role": CONTENT_KEYS, "content": ROLE_KEYS}[key] if k in m), None)
    rename = f"'{theirs}' to '{key}'" + (
        f" and '{pair}' to '{other}'" if pair is not None and other not in m else ""
    )
    return (
        f"{text}: it looks like another chat schema — rename {rename} "
        '(mlx-lm\'s chat format: {"messages": [{"role": ..., "content": ...}]})'
    )


def _check_chat(obj: dict, key: str = "messages") -> str | None:
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        return f"'{key}' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{key}[{i}] is {_kind(m)}, not an object"
        if "role" not in m:
            return _missing(i, m, "role", key)
        role = m.get("role")
        if role not in CHAT_ROLES:
            return f"{key}[{i}].role is {_short(role)}, not one of {', '.join(CHAT_ROLES)}"
        content = m.get("content")
        if role == "tool" or (role == "assistant" and m.get("tool_calls")):
            # tool results may be empty; a tool-calling assistant turn may carry no text
            if not (isinstance(content, str) or (content is None and role == "assistant")):
                return f"{key}[{i}].content must be a string"
        elif "content" not in m:
            return _missing(i, m, "content", key)
        elif not _nonblank(content):
            what = (
                "is missing"
                if "content" not in m
                else "is empty"
                if isinstance(content, str)
                else f"is {_kind(content)}, not a string"
            )
            return f"{key}[{i}].content {what}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    if obj.get("tools") is not None and not (
        isinstance(obj["tools"], list) and all(isinstance(t, dict) for t in obj["tools"])
    ):
        return "'tools' must be a list of objects"
    return None


def _check_conversations(obj: dict) -> str | None:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list"
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            return f"conversations[{i}] is {_kind(t)}, not an object"
        if not isinstance(t.get("from"), str) or t["from"] not in CONVERSATION_ROLES:
            return (
                f"conversations[{i}].from is {_short(t.get('from'))}, not one of "
                f"{', '.join(CONVERSATION_ROLES)}"
            )
        if not _nonblank(t.get("value")):
            what = (
                "is missing"
                if "value" not in t
                else "is empty"
                if isinstance(t["value"], str)
                else f"is {_kind(t['value'])}, not a string"
            )
            return f"conversations[{i}].value {what}"
    if not any(CONVERSATION_ROLES[t["from"]] == "assistant" for t in turns):
        return "no assistant (or gpt) turn: nothing to train on"
    label = obj.get("label")
    if label is not None and label not in LABELS:
        return f"label is {_short(label)}, not one of {', '.join(LABELS)}"
    return None


def _check_line(number: int, raw: bytes, f: Features = DEFAULT) -> _Line:
    """Everything about one non-blank line. The single place the per-line rules live."""

    def bad(reason: str, fmt: str | None = None) -> _Line:
        return _Line(number, fmt, None, reason, False)

    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        return bad(f"not valid JSON ({str(e).removeprefix('JSON is malformed: ')})")
    except RecursionError:
        return bad("not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return bad(f"not a JSON object (got {_kind(obj)})")
    if f.chosen in obj or f.rejected in obj:
        keys = ((f.prompt, "prompt"), (f.chosen, "chosen"), (f.rejected, "rejected"))
        keys += ((f.system, "system"),)
        return _check_preference(number, f.rename(obj, tuple(k for k in keys if k[0] in obj)))
    if f.prompt in obj and f.completion in obj:
        for key in (f.prompt, f.completion):
            if not _nonblank(obj[key]):
                what = "is empty" if isinstance(obj[key], str) else f"is {_kind(obj[key])}"
                return bad(f"'{key}' {what}, not a non-empty string", "completions")
        pairs = ((f.prompt, "prompt"), (f.completion, "completion"))
        return _Line(number, "completions", f.rename(obj, pairs), None, False)
    if f.chat in obj:
        reason = _check_chat(obj, f.chat)
        if reason:
            return bad(reason, "chat")
        return _Line(number, "chat", f.rename(obj, ((f.chat, "messages"),)), None, False)
    if f.text in obj:
        if not _nonblank(obj[f.text]):
            what = "is empty" if isinstance(obj[f.text], str) else f"is {_kind(obj[f.text])}"
            return bad(f"'{f.text}' {what}, not a non-empty string", "text")
        return _Line(number, "text", f.rename(obj, ((f.text, "text"),)), None, False)
    if "conversations" in obj:
        reason = _check_conversations(obj)
        if reason:
            return bad(reason, "conversations")
        messages = [
            {"role": CONVERSATION_ROLES[t["from"]], "content": t["value"]}
            for t in obj["conversations"]
        ]
        undesirable = obj.get("label") == "undesirable"
        return _Line(number, "conversations", {"messages": messages}, None, undesirable)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
    return bad(
        f"no known format: expected keys {f.prompt}+{f.completion}, {f.chat}, {f.text} or conversations"
        + (f" (found {keys})" if keys else " (the object is empty)")
        + _schema_hint(obj)
    )


def _check_preference(number: int, obj: dict) -> _Line:
    """A preference pair (mlx-lm-lora's DPO/ORPO rows): prompt (optional when the sides are whole
    conversations), chosen, rejected, each a non-empty string or a chat message list; optional system."""

    def bad(reason: str) -> _Line:
        return _Line(number, "preference", None, reason, False)

    for key in ("chosen", "rejected"):
        if key not in obj:
            return bad(f"'{key}' is missing: a preference pair needs both 'chosen' and 'rejected'")
    for key in ("prompt", "chosen", "rejected", "system"):
        if key not in obj or (key == "prompt" and obj[key] is None):
            continue
        value = obj[key]
        if isinstance(value, list) and key != "system":
            reason = _check_chat({key: value}, key)
            if reason:
                return bad(reason)
        elif not _nonblank(value):
            what = "is empty" if isinstance(value, str) else f"is {_kind(value)}"
            return bad(f"'{key}' {what}, not a non-empty string or message list")
    if "prompt" not in obj and not isinstance(obj["chosen"], list):
        return bad("'prompt' is missing: plain-text chosen/rejected answers need the prompt")
    if obj["chosen"] == obj["rejected"]:
        return bad("'chosen' equals 'rejected': the pair prefers nothing")
    record = {k: obj[k] for k in ("prompt", "chosen", "rejected", "system") if k in obj}
    return _Line(number, "preference", record, None, False)


# Well-known schemas of other tools and the mlx-lm format each maps to, by the keys that give them away.
_SCHEMAS = (
    (
        {"instruction", "output"},
        "Alpaca-style: join instruction (+ input) into 'prompt' and rename 'output' to 'completion'",
    ),
    ({"prompt", "response"}, "rename 'response' to 'completion'"),
    ({"prompt", "answer"}, "rename 'answer' to 'completion'"),
    ({"question", "answer"}, "rename 'question' to 'prompt' and 'answer' to 'completion'"),
    ({"input", "output"}, "rename 'input' to 'prompt' and 'output' to 'completion'"),
    ({"conversation"}, "rename 'conversation' to 'messages' (a list of {\"role\", \"content\"})"),
    ({"dialog"}, "rename 'dialog' to 'messages' (a list of {\"role\", \"content\"})"),
    ({"chat"}, "rename 'chat' to 'messages' (a list of {\"role\", \"content\"})"),
    ({"content"}, "rename 'content' to 'text' (plain text) or use 'messages'"),
)


def _schema_hint(obj: dict) -> str:
    for keys, hint in _SCHEMAS:
        if keys <= obj.keys():
            return f": it looks like another schema — {hint}"
    return ""


def _scan(data: Any, features: Features = DEFAULT) -> tuple[str | None, list[_Line]]:
    """Check every non-blank line; lines whose format differs from the file's become bad."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise DataError(
            f"the validator takes the file's bytes, got {type(data).__name__}: "
            "read the file in binary mode"
        )
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark written by some editors
        data = data[3:]
    checked = [
        _check_line(i, raw, features)
        for i, raw in enumerate(data.split(b"\n"), start=1)
        if raw.strip()
    ]
    file_format = next((c.format for c in checked if c.reason is None), None)
    lines = [
        c._replace(
            record=None,
            undesirable=False,
            reason=f"format '{c.format}' but the file is '{file_format}'",
        )
        if c.reason is None and c.format != file_format
        else c
        for c in checked
    ]
    return file_format, lines


def _quote(problems: list[LineProblem]) -> str:
    shown = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


def validate_jsonl(data: bytes, features: Features = DEFAULT) -> DataReport:
    """Check a JSONL training file. Never raises for any bytes; DataError only for non-bytes."""
    file_format, lines = _scan(data, features)
    problems = [LineProblem(line=c.number, reason=c.reason) for c in lines if c.reason]
    n, bad = len(lines), len(problems)
    valid = n - bad
    undesirable = sum(c.undesirable for c in lines)
    ratio = bad / n if n else 0.0
    counts = f"{bad} of {n} lines {'is' if bad == 1 else 'are'} bad ({ratio:.1%})"
    reasons: list[str] = []
    if n == 0:
        verdict, reasons = "reject", ["file is empty: it has no non-blank line"]
    elif valid == 0:
        verdict = "reject"
        reasons.append(f"no valid line: {counts}: {_quote(problems)}")
    elif ratio > REJECT_RATIO:
        verdict = "reject"
        reasons.append(f"{counts}, over the {REJECT_RATIO:.0%} limit: {_quote(problems)}")
    elif valid == undesirable:
        verdict = "reject"
        reasons.append(f"all {valid} valid rows are labelled undesirable: nothing to train on")
    else:
        verdict = "warn" if ratio > WARN_RATIO else "ok"
        if bad:
            reasons.append(f"{counts}; they will be skipped: {_quote(problems)}")
    if undesirable and verdict != "reject":
        rows = "row" if undesirable == 1 else "rows"
        reasons.append(f"{undesirable} {rows} labelled undesirable will not be trained on")
    return DataReport(
        format=file_format,
        lines=n,
        valid=valid,
        problems=problems,
        bad_ratio=ratio,
        verdict=verdict,
        reasons=reasons,
        undesirable=undesirable,
    )


def record_lines(data: bytes, features: Features = DEFAULT) -> list[int]:
    """The line number (1-based) of each record valid_records returns, in the same order: example i of
    a job is line record_lines(data)[i] of its data file."""
    _, lines = _scan(data, features)
    return [c.number for c in lines if c.record is not None and not c.undesirable]


def valid_records(data: bytes, features: Features = DEFAULT) -> list[dict]:
    """The records the trainer uses, in file order, in mlx-lm formats: bad lines and
    undesirable-labelled rows dropped, conversations rows turned into {"messages": [...]}, renamed
    keys (``features``) under mlx-lm's default names."""
    _, lines = _scan(data, features)
    return [c.record for c in lines if c.record is not None and not c.undesirable]


def long_records(data: bytes, limit: int, features: Features = DEFAULT) -> list[tuple[int, int]]:
    """(index in valid_records, line number) of every record whose line is longer than ``limit``
    bytes, in file order. Only the lengths are looked at unless a line is that long."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw = data.split(b"\n")
    if max(map(len, raw), default=0) <= limit:
        return []
    return [(i, n) for i, n in enumerate(record_lines(data, features)) if len(raw[n - 1]) > limit]
