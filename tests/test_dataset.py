import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftctl.core.dataset import (
    REJECT_RATIO,
    WARN_RATIO,
    DataError,
    DataReport,
    LineProblem,
    valid_records,
    validate_jsonl,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "some text"}
CONV = {
    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    "label": "desirable",
}


def jl(*rows) -> bytes:
    return b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n"


def only_problem(data: bytes) -> LineProblem:
    report = validate_jsonl(data)
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt",
    [(COMPLETION, "completions"), (CHAT, "chat"), (TEXT, "text"), (CONV, "conversations")],
)
def test_each_format_is_recognised(row, fmt):
    r = validate_jsonl(jl(row, row))
    assert (r.format, r.lines, r.valid, r.problems, r.verdict, r.reasons) == (
        fmt,
        2,
        2,
        [],
        "ok",
        [],
    )
    assert r.bad_ratio == 0.0 and r.undesirable == 0


def test_format_detection_follows_mlx_lm_order():
    both = {"prompt": "p", "completion": "c", "messages": CHAT["messages"], "text": "t"}
    assert validate_jsonl(jl(both)).format == "completions"
    assert validate_jsonl(jl({"messages": CHAT["messages"], "text": "t"})).format == "chat"
    assert (
        validate_jsonl(jl({"text": "t", "conversations": CONV["conversations"]})).format == "text"
    )
    # prompt without completion is not the completions format
    assert validate_jsonl(jl({"prompt": "p", "text": "t"})).format == "text"


def test_chat_with_tools_and_tool_messages():
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w"}}]},
            {"role": "tool", "content": ""},
            {"role": "assistant", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "w"}}],
    }
    assert validate_jsonl(jl(row)).valid == 1
    assert valid_records(jl(row)) == [row]


def test_extra_keys_are_kept():
    row = {**TEXT, "id": 7}
    assert valid_records(jl(row)) == [row]


# --- per-line rules, with the exact reason --------------------------------------------------------


@pytest.mark.parametrize(
    "line, reason",
    [
        (b"{not json", "not valid JSON ("),
        (b'{"text": "a"} trailing', "not valid JSON (trailing characters"),
        (b'{"text": NaN}', "not valid JSON ("),
        (b"[1, 2]", "not a JSON object (got an array)"),
        (b'"text"', "not a JSON object (got a string)"),
        (b"3", "not a JSON object (got a number)"),
        (b"null", "not a JSON object (got null)"),
        (
            b"{}",
            "no known format: expected keys prompt+completion, messages, text or conversations "
            "(the object is empty)",
        ),
        (
            b'{"input": "x", "output": "y"}',
            "no known format: expected keys prompt+completion, messages, "
            "text or conversations (found 'input', 'output')",
        ),
        (b'{"prompt": "x"}', "no known format"),
        # completions
        (b'{"prompt": "", "completion": "y"}', "'prompt' is empty, not a non-empty string"),
        (b'{"prompt": "x", "completion": "  "}', "'completion' is empty, not a non-empty string"),
        (b'{"prompt": "x", "completion": 3}', "'completion' is a number, not a non-empty string"),
        # text
        (b'{"text": ""}', "'text' is empty, not a non-empty string"),
        (b'{"text": ["a"]}', "'text' is an array, not a non-empty string"),
        # chat
        (b'{"messages": []}', "'messages' must be a non-empty list"),
        (b'{"messages": "hi"}', "'messages' must be a non-empty list"),
        (b'{"messages": ["hi"]}', "messages[0] is a string, not an object"),
        (
            b'{"messages": [{"role": "bot", "content": "x"}]}',
            "messages[0].role is 'bot', not one of system, user, assistant, tool",
        ),
        (
            b'{"messages": [{"content": "x"}]}',
            "messages[0] has no 'role' key (its keys: 'content')",
        ),
        (b'{"messages": [{"role": null, "content": "x"}]}', "messages[0].role is null, not one of"),
        (
            b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
            "messages[0] has no 'content' key (its keys: 'role')",
        ),
        # another chat schema's keys: the missing key named, and the renaming
        (
            b'{"messages": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]}',
            "messages[0] has no 'role' key (its keys: 'speaker', 'text'): it looks like another chat "
            "schema — rename 'speaker' to 'role' and 'text' to 'content'",
        ),
        (
            b'{"messages": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]}',
            "messages[0] has no 'content' key (its keys: 'role', 'text'): it looks like another chat "
            "schema — rename 'text' to 'content'",
        ),
        (
            b'{"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
            "these are ShareGPT turns — name the list 'conversations' instead of 'messages'",
        ),
        (
            b'{"instruction": "q", "input": "", "output": "a"}',
            "it looks like another schema — Alpaca-style: join instruction (+ input) into 'prompt'",
        ),
        (
            b'{"question": "q", "answer": "a"}',
            "rename 'question' to 'prompt' and 'answer' to 'completion'",
        ),
        (
            b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}',
            "messages[0].content is empty",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 1}]}',
            "messages[1].content is a number, not a string",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
            "messages[1].content is empty",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": null}, '
            b'{"role": "assistant", "content": "a"}]}',
            "messages[1].content must be a string",
        ),
        (
            b'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}',
            "no assistant message: nothing to train on",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
            b'"tools": {"a": 1}}',
            "'tools' must be a list of objects",
        ),
        # conversations
        (b'{"conversations": []}', "'conversations' must be a non-empty list"),
        (b'{"conversations": [1]}', "conversations[0] is a number, not an object"),
        (
            b'{"conversations": [{"from": "bot", "value": "x"}]}',
            "conversations[0].from is 'bot', not one of system, user, human, assistant, gpt",
        ),
        (
            b'{"conversations": [{"from": ["user"], "value": "x"}]}',
            "conversations[0].from is an array, not one of",
        ),
        (
            b'{"conversations": [{"from": "user", "value": ""}, {"from": "gpt", "value": "a"}]}',
            "conversations[0].value is empty",
        ),
        (
            b'{"conversations": [{"from": "user"}, {"from": "gpt", "value": "a"}]}',
            "conversations[0].value is missing",
        ),
        (
            b'{"conversations": [{"from": "user", "value": "q"}]}',
            "no assistant (or gpt) turn: nothing to train on",
        ),
        (
            b'{"conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}], '
            b'"label": "good"}',
            "label is 'good', not one of desirable, undesirable",
        ),
    ],
)
def test_bad_line_reasons(line, reason):
    data = jl(*([TEXT] * 3 if b'"text"' not in line else [COMPLETION] * 3))
    # the bad line second, so the file's format comes from a good line of another format...
    lines = data.splitlines()
    body = b"\n".join([lines[0], line, *lines[1:]])
    problems = [p for p in validate_jsonl(body).problems if p.line == 2]
    assert len(problems) == 1
    # ...and check the reason on its own, where it is the file's only line
    assert reason in problems[0].reason
    assert reason in only_problem(line).reason


def test_invalid_utf8_names_the_line_and_byte():
    p = only_problem(jl(TEXT, TEXT) + b'{"text": "caf\xe9"}\n')
    assert p == LineProblem(line=3, reason="not valid UTF-8 (byte 0xe9 at column 14)")


def test_lone_surrogate_escape_is_bad_json():
    assert only_problem(b'{"text": "\\ud800"}').reason.startswith("not valid JSON (")


def test_deep_nesting_does_not_crash():
    r = validate_jsonl(b"[" * 100_000 + b"\n" + jl(TEXT))
    assert r.problems[0].line == 1 and r.problems[0].reason.startswith("not valid JSON")


def test_mixed_formats_are_bad_lines():
    data = jl(CHAT, CHAT, TEXT, CHAT, COMPLETION, CHAT, TEXT)
    r = validate_jsonl(data)
    assert r.format == "chat"
    assert [(p.line, p.reason) for p in r.problems] == [
        (3, "format 'text' but the file is 'chat'"),
        (5, "format 'completions' but the file is 'chat'"),
        (7, "format 'text' but the file is 'chat'"),
    ]


def test_file_format_is_that_of_the_first_valid_line():
    r = validate_jsonl(jl({"text": ""}, b"garbage", CHAT, TEXT))
    assert r.format == "chat"
    assert [p.line for p in r.problems] == [1, 2, 4]
    assert r.problems[0].reason == "'text' is empty, not a non-empty string"


def test_conversations_and_chat_do_not_mix():
    r = validate_jsonl(jl(CONV, CHAT))
    assert r.problems == [
        LineProblem(line=2, reason="format 'chat' but the file is 'conversations'")
    ]


# --- blank lines, line numbers, BOM ---------------------------------------------------------------


def test_blank_lines_are_skipped_but_keep_line_numbers():
    data = b"\n\n" + jl(TEXT) + b"   \n\t\n" + b"oops\r\n" + jl(TEXT)
    r = validate_jsonl(data)
    assert r.lines == 3 and r.valid == 2
    assert r.problems == [LineProblem(line=6, reason=r.problems[0].reason)]


def test_crlf_line_endings_and_missing_final_newline():
    data = json.dumps(TEXT).encode() + b"\r\n" + json.dumps(TEXT).encode()
    assert validate_jsonl(data).valid == 2


def test_utf8_bom_is_accepted():
    assert validate_jsonl(b"\xef\xbb\xbf" + jl(TEXT)).verdict == "ok"


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\t\n\r\n", b"\xef\xbb\xbf"])
def test_empty_file_is_rejected(data):
    r = validate_jsonl(data)
    assert (r.verdict, r.lines, r.valid, r.format) == ("reject", 0, 0, None)
    assert r.reasons == ["file is empty: it has no non-blank line"]


# --- verdict --------------------------------------------------------------------------------------


def test_no_valid_line_is_rejected():
    r = validate_jsonl(b"a\nb\n")
    assert r.verdict == "reject" and r.format is None and r.bad_ratio == 1.0
    assert r.reasons[0].startswith(
        "no valid line: 2 of 2 lines are bad (100.0%): line 1: not valid JSON"
    )


def test_over_five_percent_bad_is_rejected_with_ratio_counts_and_first_problems():
    data = jl(*[TEXT] * 94, *[b"bad"] * 6)
    r = validate_jsonl(data)
    assert r.verdict == "reject" and r.bad_ratio == pytest.approx(0.06)
    assert r.reasons[0].startswith(
        "6 of 100 lines are bad (6.0%), over the 5% limit: line 95: not valid JSON"
    )
    assert r.reasons[0].endswith("; and 3 more")
    assert len(r.problems) == 6  # all problems, not just the quoted ones


def test_exactly_five_percent_warns():
    r = validate_jsonl(jl(*[TEXT] * 95, *[b"bad"] * 5))
    assert r.verdict == "warn"
    assert r.reasons[0].startswith("5 of 100 lines are bad (5.0%); they will be skipped: line 96")


def test_over_one_percent_warns_and_one_percent_is_ok():
    assert validate_jsonl(jl(*[TEXT] * 98, *[b"bad"] * 2)).verdict == "warn"
    r = validate_jsonl(jl(*[TEXT] * 99, b"bad"))
    assert r.verdict == "ok"
    assert r.reasons == [
        "1 of 100 lines is bad (1.0%); they will be skipped: line 100: " + r.problems[0].reason
    ]


def test_undesirable_rows_are_valid_but_not_trained_on():
    bad_row = {**CONV, "label": "undesirable"}
    no_label = {"conversations": CONV["conversations"]}
    data = jl(CONV, bad_row, no_label, {**CONV, "label": None})
    r = validate_jsonl(data)
    assert (r.valid, r.undesirable, r.verdict) == (4, 1, "ok")
    assert r.reasons == ["1 row labelled undesirable will not be trained on"]
    assert len(valid_records(data)) == 3


def test_all_undesirable_is_rejected():
    r = validate_jsonl(jl({**CONV, "label": "undesirable"}))
    assert r.verdict == "reject"
    assert r.reasons == ["all 1 valid rows are labelled undesirable: nothing to train on"]


# --- valid_records -------------------------------------------------------------------------------


def test_valid_records_normalizes_conversations_to_chat():
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ],
        "label": "desirable",
    }
    assert valid_records(jl(row)) == [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"},
            ]
        }
    ]


def test_valid_records_keeps_file_order_and_skips_bad_lines():
    rows = [{"text": f"row {i}"} for i in range(5)]
    data = jl(rows[0], b"junk", rows[1], CHAT, rows[2], rows[3], b"", rows[4])
    assert valid_records(data) == rows


def test_valid_records_of_mlx_lm_formats_are_loadable_by_mlx_lm():
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset, create_dataset

    expected = {
        "chat": ChatDataset,
        "completions": CompletionsDataset,
        "text": TextDataset,
        "conversations": ChatDataset,
    }
    for row, fmt in [
        (CHAT, "chat"),
        (COMPLETION, "completions"),
        (TEXT, "text"),
        (CONV, "conversations"),
    ]:
        records = valid_records(jl(row))
        ds = create_dataset(records, tokenizer=None, config=SimpleNamespace())
        assert isinstance(ds, expected[fmt])


# --- misuse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["text", None, 3, [b"a"]])
def test_non_bytes_is_misuse(arg):
    with pytest.raises(DataError, match="takes the file's bytes"):
        validate_jsonl(arg)
    with pytest.raises(DataError):
        valid_records(arg)


def test_bytearray_and_memoryview_are_accepted():
    assert validate_jsonl(bytearray(jl(TEXT))).valid == 1
    assert valid_records(memoryview(jl(TEXT))) == [TEXT]


# --- fuzz -----------------------------------------------------------------------------------------


def check_consistent(data: bytes) -> DataReport:
    r = validate_jsonl(data)
    assert isinstance(r, DataReport)
    assert r.valid + len(r.problems) == r.lines
    assert r.valid >= r.undesirable >= 0
    assert [p.line for p in r.problems] == sorted({p.line for p in r.problems})
    assert all(p.line >= 1 and p.reason for p in r.problems)
    if r.lines == 0:
        assert r.verdict == "reject" and r.bad_ratio == 0.0
    else:
        assert r.bad_ratio == pytest.approx(len(r.problems) / r.lines)
    if r.lines == 0 or r.valid == 0 or r.bad_ratio > REJECT_RATIO or r.valid == r.undesirable:
        assert r.verdict == "reject" and r.reasons
    elif r.bad_ratio > WARN_RATIO:
        assert r.verdict == "warn" and r.reasons
    else:
        assert r.verdict == "ok"
    assert (r.format is None) == (r.valid == 0)
    records = valid_records(data)
    assert len(records) == r.valid - r.undesirable
    assert all(isinstance(rec, dict) for rec in records)
    return r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    check_consistent(data)


GOOD_ROWS = [CHAT, COMPLETION, TEXT, CONV, {**CONV, "label": "undesirable"}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "text",
                    "messages",
                    "role",
                    "content",
                    "prompt",
                    "completion",
                    "from",
                    "value",
                    "conversations",
                    "label",
                    "tools",
                ]
            )
            | st.text(max_size=4),
            c,
            max_size=4,
        )
    ),
    max_leaves=12,
)
line = st.one_of(
    st.sampled_from(GOOD_ROWS).map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=20),
    st.sampled_from([b"", b"  ", b"\xff\xfe", b'{"text": "\xc3"}', b"\r", b"{"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, max_size=25))
def test_fuzz_lines_mixing_records_and_garbage(lines):
    data = b"\n".join(lines)
    r = check_consistent(data)
    nonblank = [x for x in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if x.strip()]
    assert r.lines == len(nonblank)


def _pref(lines):
    import json as _json

    return "\n".join(_json.dumps(x) for x in lines).encode()


def test_preference_pairs_in_plain_text_and_chat_forms_are_valid():
    from ftctl.core.dataset import validate_jsonl

    chat = [{"role": "user", "content": "hi"}]
    data = _pref(
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "be exact"},
            {
                "chosen": chat + [{"role": "assistant", "content": "hello"}],
                "rejected": chat + [{"role": "assistant", "content": "go away"}],
            },
        ]
    )
    r = validate_jsonl(data)
    assert (r.format, r.valid, r.problems) == ("preference", 2, [])


def test_preference_validation_names_the_bad_lines():
    from ftctl.core.dataset import validate_jsonl

    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    data = _pref(
        [
            good,
            {"prompt": "p", "chosen": "a"},
            {"prompt": "p", "chosen": "", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"chosen": "a", "rejected": "b"},
        ]
    )
    r = validate_jsonl(data)
    reasons = {p.line: p.reason for p in r.problems}
    assert r.valid == 1 and sorted(reasons) == [2, 3, 4, 5]
    assert "'rejected' is missing" in reasons[2]
    assert "'chosen' is empty" in reasons[3]
    assert "equals 'rejected'" in reasons[4]
    assert "'prompt' is missing" in reasons[5]
