"""The QMP wire core (vdisk.qmp json_parser, json_writer, schema, connection): framing, negotiation, request checks,
argument schemas and serializers.

The expected texts come from QEMU; where qemu-storage-daemon is installed, ``test_replies_match_qemu``
replays every case against it and compares the reply bytes with ours, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdisk.errors import CommandNotFound, GenericError, InvalidArgument, ProtocolError, StateError
from vdisk.qmp import connection, json_parser
from vdisk.qmp.connection import NO_ID, Command, InputKind, Negotiated, QMPConnectionCore, QMPState, Rejected
from vdisk.qmp.json_parser import JSONStreamParser, JSONValue
from vdisk.qmp.json_writer import encode_json
from vdisk.qmp.schema import EnumType, validate_arguments

HYPOTHESIS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEGOTIATE = b'{"execute": "qmp_capabilities"}'
SENTINEL = b'\x01\n{"id": "__end__"}'
SENTINEL_REPLY = (b'{"id": "__end__", "error": {"class": "GenericError", '
                  b'"desc": "QMP input lacks member \'execute\'"}}\r\n')


# --- helpers ----------------------------------------------------------------------------------------------


def dispatch_stub(command: Command) -> bytes:
    """What QEMU answers for a command it does not have."""
    return connection.reply_exception(connection.command_not_found(command.name), command.id)


def replies(core: QMPConnectionCore, chunks) -> bytes:
    out = []
    for chunk in chunks:
        for item in core.receive_data(chunk):
            out.append(dispatch_stub(item) if isinstance(item, Command) else item.reply)
    return b"".join(out)


def run(data: bytes, *, mode: str = "whole", **core_args) -> bytes:
    core = QMPConnectionCore(**core_args)
    if mode == "whole":
        return replies(core, [data])
    if mode == "bytewise":
        return replies(core, [data[i:i + 1] for i in range(len(data))])
    raise AssertionError(mode)


def error_line(desc: str, cls: str = "GenericError", id_json: str | None = None) -> bytes:
    desc_json = encode_json(desc)
    head = f'{{"id": {id_json}, ' if id_json is not None else "{"
    return f'{head}"error": {{"class": "{cls}", "desc": {desc_json}}}}}\r\n'.encode()


def command_mode_core(**limits) -> QMPConnectionCore:
    """A core past negotiation, with ``limits`` (max_message_size, max_nesting) applied after it."""
    core = QMPConnectionCore()
    [negotiated] = core.receive_data(NEGOTIATE)
    assert isinstance(negotiated, Negotiated)
    for name, value in limits.items():
        setattr(core, name, value)
    return core


# --- the cases, with QEMU's replies (qemu-storage-daemon 7.2) ---------------------------------------------

NOT_NEGOTIATED = error_line("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
ALREADY = "Capabilities negotiation is already complete, command ignored"

CASES: list[tuple[str, bytes, bytes]] = [
    ("command before negotiation", b'{"execute": "query-jobs"}', NOT_NEGOTIATED),
    ("command before negotiation keeps id", b'{"execute": "query-jobs", "id": "a"}',
     error_line("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", '"a"')),
    ("negotiate then renegotiate",
     b'{"execute":"qmp_capabilities","id":7}{"execute":"qmp_capabilities","id":[1,{"a":null}]}',
     b'{"return": {}, "id": 7}\r\n' + error_line(ALREADY, "CommandNotFound", '[1, {"a": null}]')),
    ("not an object", b"[1]", error_line("QMP input must be a JSON object")),
    ("top-level number", b"123 ", error_line("QMP input must be a JSON object")),
    ("top-level string", b'"x"', error_line("QMP input must be a JSON object")),
    ("missing value", b'{"execute": }', error_line("JSON parse error, expecting value")),
    ("unexpected member, single quotes", b"{'execute': 'nope', 'x': 1}",
     error_line("QMP input member 'x' is unexpected")),
    ("stray character", b"@", error_line("JSON parse error, stray '@'")),
    ("newline inside a string", b'{"execute": "ab\ncd"}',
     error_line("JSON parse error, stray '\"ab\n'") + error_line("JSON parse error, expecting value")),
    ("duplicate key", b'{"a":1,"a":2}', error_line("JSON parse error, duplicate key")),
    ("duplicate execute", b'{"execute":"x","execute":"y"}', error_line("JSON parse error, duplicate key")),
    ("lone surrogate escape", b'"\\ud800"', error_line("JSON parse error, \\ud800 is not a valid Unicode character")),
    ("surrogate then non-surrogate", b'"\\ud800\\u0041"',
     error_line("JSON parse error, \\ud800 is not a valid Unicode character")),
    ("short unicode escape", b'"\\u12"', error_line('JSON parse error, \\u12" is not a valid Unicode character')),
    ("noncharacter escape", b'"\\uffff"', error_line("JSON parse error, \\uffff is not a valid Unicode character")),
    ("surrogate pair is fine", b'"\\ud83d\\ude00"', error_line("QMP input must be a JSON object")),
    ("modified UTF-8 NUL", b'"\xc0\x80"', error_line("QMP input must be a JSON object")),
    ("encoded surrogate", b'"\xed\xa0\x80"', error_line("JSON parse error, invalid UTF-8 sequence in string")),
    ("encoded noncharacter", b'"\xef\xbf\xbf"', error_line("JSON parse error, invalid UTF-8 sequence in string")),
    ("bad escape", b'"ab\\x"', error_line("JSON parse error, invalid escape sequence in string")),
    ("execute not a string", b'{"execute":1}', error_line("QMP input member 'execute' must be a string")),
    ("exec-oob before oob", b'{"exec-oob":"x"}', error_line("QMP input member 'exec-oob' is unexpected")),
    ("arguments not an object", b'{"execute":"x","arguments":[]}',
     error_line("QMP input member 'arguments' must be an object")),
    ("no execute", b'{"id":1}', error_line("QMP input lacks member 'execute'", id_json="1")),
    ("bracket closed by brace", b"[}]\n", error_line("JSON parse error, expecting value") * 2),
    ("brace closed by bracket", b"{]\n", error_line("JSON parse error, expecting value")),
    ("stray closing brace", b"}\n", error_line("JSON parse error, expecting value")),
    ("list separator", b"[1}\n", error_line("JSON parse error, expected separator in list")),
    ("dict separator", b'{"a":1]\n', error_line("JSON parse error, expected separator in dict")),
    ("missing colon", b'{"a" 1}\n', error_line("JSON parse error, missing : in object pair")),
    ("key not a string", b"{1:2}", error_line("JSON parse error, key is not a string in object")),
    ("inner error wins over bad key", b"{[1 2]:3}", error_line("JSON parse error, expected separator in list")),
    ("trailing comma in list", b"[1,]", error_line("JSON parse error, expecting value")),
    ("trailing comma in object", b'{"a":1,}', error_line("JSON parse error, expecting value")),
    ("control character", b"\x01", error_line("JSON parse error, stray '\x01'")),
    ("bad keyword", b"tru ", error_line("JSON parse error, invalid keyword 'tru'")),
    ("leading zero", b"0123\n", error_line("JSON parse error, stray '01'")),
    ("lone minus", b"-\n", error_line("JSON parse error, stray '-\n'")),
    ("tab in string", b'"\t"', error_line("JSON parse error, stray '\"\t'")),
    ("invalid byte in string", b'"\xff"', error_line("JSON parse error, stray '\"\ufffd'")),
    ("invalid byte", b"\xff", error_line("JSON parse error, stray '\ufffd'")),
    ("message split over lines", b'{"execute":\r\n "nope",\n "id": 3}',
     b'{"id": 3, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with '
     b"'qmp_capabilities'\"}}\r\n"),
    ("nested list completes later", b"[[1]\n]\n", error_line("QMP input must be a JSON object")),
    ("capabilities: enable not a list", b'{"execute":"qmp_capabilities", "arguments": {"enable": "oob"}}',
     error_line("Invalid parameter type for 'enable', expected: array")),
    ("capabilities: element not a string", b'{"execute":"qmp_capabilities", "arguments": {"enable": [1]}}',
     error_line("Invalid parameter type for 'enable[0]', expected: string")),
    ("capabilities: unknown capability", b'{"execute":"qmp_capabilities", "arguments": {"enable": ["foo"]}}',
     error_line("Parameter 'null' does not accept value 'foo'")),
    ("capabilities: unexpected argument", b'{"execute":"qmp_capabilities", "arguments": {"x": [1]}}',
     error_line("Parameter 'x' is unexpected")),
    ("capabilities: empty list", b'{"execute":"qmp_capabilities", "arguments": {"enable": []}}',
     b'{"return": {}}\r\n'),
    ("unknown command keeps null id", NEGOTIATE + b'{"execute":"nope","id":null}',
     b'{"return": {}}\r\n' + error_line("The command nope has not been found", "CommandNotFound", "null")),
    ("numbers and escapes in id", NEGOTIATE + b'{"execute":"nope","id":[1.5,-0,1e400,18446744073709551615,'
     b'18446744073709551616,-9223372036854775809,-9223372036854775808,"\\u0000\\/",0.1,1E+2,-1.5e-3]}',
     b'{"return": {}}\r\n' + error_line(
         "The command nope has not been found", "CommandNotFound",
         '[1.5, 0, inf, 18446744073709551615, 1.8446744073709552e+19, -9.2233720368547758e+18, '
         '-9223372036854775808, "\\u0000/", 0.10000000000000001, 100, -0.0015]')),
    ("non-ASCII id is escaped",
     NEGOTIATE + b'{"execute":"nope","id":"\xc3\xa9\xf0\x9f\x98\x80\\u007f\\u0001\\b\\f\\n\\r\\t"}',
     b'{"return": {}}\r\n' + error_line("The command nope has not been found", "CommandNotFound",
                                        '"\\u00E9\\uD83D\\uDE00\\u007F\\u0001\\b\\f\\n\\r\\t"')),
    ("single-quoted escapes", NEGOTIATE + b"{'execute': 'no\\'pe', 'id': 'say \"hi\"'}",
     b'{"return": {}}\r\n' + error_line("The command no'pe has not been found", "CommandNotFound",
                                        '"say \\"hi\\""')),
    ("several messages in one chunk", NEGOTIATE + b'{"execute":"nope"} {"execute":"nope2"}\n{"execute":\n"nope3"}',
     b'{"return": {}}\r\n' + error_line("The command nope has not been found", "CommandNotFound")
     + error_line("The command nope2 has not been found", "CommandNotFound")
     + error_line("The command nope3 has not been found", "CommandNotFound")),
    ("deeply nested id", NEGOTIATE + b'{"execute":"nope","id":' + b"[" * 50 + b"]" * 50 + b"}",
     b'{"return": {}}\r\n' + error_line("The command nope has not been found", "CommandNotFound",
                                        "[" * 50 + "]" * 50)),
    ("oob negotiated, exec-oob dispatched",
     b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}{"exec-oob":"nope","id":1}',
     b'{"return": {}}\r\n' + error_line("The command nope has not been found", "CommandNotFound", "1")),
    ("oob negotiated, qmp_capabilities out of band",
     b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}{"exec-oob":"qmp_capabilities"}',
     b'{"return": {}}\r\n' + error_line("The command qmp_capabilities does not support OOB")),
    ("renegotiation checks arguments first", NEGOTIATE + b'{"execute":"qmp_capabilities","arguments":{"x":1}}',
     b'{"return": {}}\r\n' + error_line("Parameter 'x' is unexpected")),
]
CASE_IDS = [name for name, _, _ in CASES]
OOB = {"capabilities": ("oob",)}  # what qemu-storage-daemon offers


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=CASE_IDS)
def test_reply_bytes_fed_whole(name, data, expected):
    assert run(data, **OOB) == expected


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=CASE_IDS)
def test_reply_bytes_fed_one_byte_at_a_time(name, data, expected):
    assert run(data, mode="bytewise", **OOB) == expected


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=CASE_IDS)
def test_reply_bytes_with_trailing_data(name, data, expected):
    """A resync byte and a half-sent message after the case change nothing in its replies."""
    trailing = b'\x01\n{"execute": "nope", "argum'
    out = run(data + trailing, **OOB)
    assert out.startswith(expected)
    assert out[len(expected):] == error_line("JSON parse error, stray '\x01'")


# --- framing ----------------------------------------------------------------------------------------------


def test_crlf_and_lf_and_no_line_end_frame_the_same():
    for sep in (b"\r\n", b"\n", b"", b" ", b"\t"):
        core = command_mode_core()
        items = core.receive_data(b'{"execute": "a"}' + sep + b'{"execute": "b"}' + sep)
        assert [i.name for i in items] == ["a", "b"]


def test_message_split_at_every_position_gives_the_same_command():
    message = b'{"execute": "block-stream", "arguments": {"device": "d\\u00e9", "speed": -1.5e3}, "id": [1]}'
    for cut in range(len(message) + 1):
        core = command_mode_core()
        items = core.receive_data(message[:cut]) + core.receive_data(message[cut:])
        assert items == [Command("block-stream", {"device": "dé", "speed": -1500.0}, [1])]


@st.composite
def chunked(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


ALL_CASES = b"\x01\n".join(data for _, data, _ in CASES)


@HYPOTHESIS
@given(st.data())
def test_any_chunking_gives_the_same_replies(data):
    expected = run(ALL_CASES, **OOB)
    chunks = data.draw(chunked(ALL_CASES))
    assert replies(QMPConnectionCore(**OOB), chunks) == expected


@HYPOTHESIS
@given(garbage=st.binary(max_size=200), chunks=st.integers(1, 5))
def test_garbage_never_kills_the_connection(garbage, chunks):
    """Whatever came before, a control character resyncs and the next message is read (QMP spec)."""
    core = command_mode_core()
    data = garbage + b"\x01\n" + b'{"execute": "after", "id": "x"}'
    step = max(1, len(data) // chunks)
    items = []
    for i in range(0, len(data), step):
        items += core.receive_data(data[i:i + step])
    for item in items:
        assert isinstance(item, (Command, Rejected))
        if isinstance(item, Rejected):
            assert isinstance(item.error, (ProtocolError, GenericError, CommandNotFound))
            assert item.reply.endswith(b"\r\n") and item.reply.isascii()
    assert items[-1] == Command("after", {}, "x")


def test_incomplete_message_waits_for_more_bytes():
    core = command_mode_core()
    assert core.receive_data(b'{"execute": "x", "arguments": {"a": [1, 2') == []
    assert core.receive_data(b"]}}") == [Command("x", {"a": [1, 2]})]


def test_top_level_number_needs_a_terminator():
    core = command_mode_core()
    assert core.receive_data(b"42") == []
    [item] = core.receive_data(b"\n")
    assert str(item.error) == "QMP input must be a JSON object"


# --- limits -----------------------------------------------------------------------------------------------


def test_oversized_message_is_refused_once_and_the_core_resyncs():
    core = command_mode_core()
    big = b'{"execute": "x", "arguments": {"blob": "' + b"a" * (1 << 20) + b'", "n": [1, {"k": "}"}]}}'
    items = core.receive_data(big + b'\n{"execute": "after"}')
    assert [type(i) for i in items] == [Rejected, Command]
    assert isinstance(items[0].error, ProtocolError)
    assert items[0].reply == error_line("JSON token size limit exceeded")
    assert items[1] == Command("after", {})


def test_oversized_message_fed_bytewise_is_refused_once():
    core = command_mode_core(max_message_size=64)
    message = b'{"execute": "x", "arguments": {"blob": "' + b"}" * 100 + b'"}}'
    items = []
    for i in range(len(message)):
        items += core.receive_data(message[i:i + 1])
    items += core.receive_data(b'{"execute": "after"}')
    assert [str(i.error) for i in items[:-1]] == ["JSON token size limit exceeded"]
    assert items[-1] == Command("after", {})


def test_message_exactly_at_the_limit_is_accepted():
    message = b'{"execute": "x", "id": "' + b"z" * 100 + b'"}'
    core = command_mode_core(max_message_size=len(message))
    assert core.receive_data(message) == [Command("x", {}, "z" * 100)]
    core = command_mode_core(max_message_size=len(message) - 1)
    [item] = core.receive_data(message)
    assert str(item.error) == "JSON token size limit exceeded"


def test_oversized_top_level_string_then_resync():
    core = command_mode_core(max_message_size=20)
    items = core.receive_data(b'"' + b"q" * 50 + b'" {"execute": "ok"}')
    assert [str(i.error) for i in items[:-1]] == ["JSON token size limit exceeded"]
    assert items[-1] == Command("ok", {})


def test_control_character_ends_an_oversized_message_early():
    core = command_mode_core(max_message_size=20)
    items = core.receive_data(b'{"execute": "x", "arguments": {"a": [[[[' + b'\x02{"execute": "ok"}')
    assert [str(i.error) for i in items[:-1]] == ["JSON token size limit exceeded"]
    assert items[-1] == Command("ok", {})


def test_whitespace_inside_a_message_counts_but_not_between_messages():
    core = command_mode_core(max_message_size=30)
    assert core.receive_data(b" " * 1000 + b'{"execute": "x"}' + b"\n" * 1000) == [Command("x", {})]
    [item] = core.receive_data(b'{"execute": "x"' + b" " * 30 + b"}")
    assert str(item.error) == "JSON token size limit exceeded"


def test_nesting_limit_is_refused_once():
    core = command_mode_core(max_nesting=8)
    items = core.receive_data(b'{"execute": "x", "id": ' + b"[" * 8 + b"]" * 8 + b"}")
    assert [str(i.error) for i in items] == ["JSON nesting depth limit exceeded"]
    core = command_mode_core(max_nesting=8)
    assert core.receive_data(b'{"execute": "x", "id": ' + b"[" * 7 + b"]" * 7 + b"}") == [
        Command("x", {}, [[[[[[[]]]]]]])
    ]


def test_default_nesting_of_1024_parses_and_echoes_without_recursion():
    core = command_mode_core()
    depth = 1023  # plus the enclosing object = QEMU's limit of 1024
    [command] = core.receive_data(b'{"execute": "x", "id": ' + b"[" * depth + b"]" * depth + b"}")
    reply = connection.reply_return({}, command.id)
    assert reply == b'{"return": {}, "id": ' + b"[" * depth + b"]" * depth + b"}\r\n"


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        JSONStreamParser(max_message_size=0)
    with pytest.raises(ValueError):
        QMPConnectionCore(max_nesting=0)
    core = QMPConnectionCore(max_message_size=5, max_nesting=2)
    assert (core.max_message_size, core.max_nesting) == (5, 2)
    for name in ("max_message_size", "max_nesting"):
        with pytest.raises(ValueError):
            setattr(core, name, 0)


# --- negotiation table ------------------------------------------------------------------------------------


EXPECTED_NEGOTIATION = {
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.QMP_CAPABILITIES): (QMPState.COMMAND_MODE, "accept_capabilities"),
    (QMPState.CAPABILITIES_NEGOTIATION, InputKind.OTHER_COMMAND):
        (QMPState.CAPABILITIES_NEGOTIATION, "refuse_not_negotiated"),
    (QMPState.COMMAND_MODE, InputKind.QMP_CAPABILITIES): (QMPState.COMMAND_MODE, "refuse_already_negotiated"),
    (QMPState.COMMAND_MODE, InputKind.OTHER_COMMAND): (QMPState.COMMAND_MODE, "dispatch"),
}


@pytest.mark.parametrize("state", list(QMPState))
@pytest.mark.parametrize("kind", list(InputKind))
def test_every_negotiation_pair(state, kind):
    next_state, action = connection.negotiation_step(state, kind)
    assert (next_state, action.value) == EXPECTED_NEGOTIATION[(state, kind)]


@pytest.mark.parametrize("pair", [("capabilities_negotiation", InputKind.OTHER_COMMAND),
                                  (QMPState.COMMAND_MODE, "qmp_capabilities"), (None, None)])
def test_unknown_negotiation_pair_raises(pair):
    with pytest.raises(StateError):
        connection.negotiation_step(*pair)


@pytest.mark.parametrize("state", list(QMPState))
@pytest.mark.parametrize("kind", list(InputKind))
def test_every_negotiation_pair_on_the_wire(state, kind):
    core = QMPConnectionCore() if state is QMPState.CAPABILITIES_NEGOTIATION else command_mode_core()
    name = "qmp_capabilities" if kind is InputKind.QMP_CAPABILITIES else "query-jobs"
    [item] = core.receive_data(json.dumps({"execute": name, "id": 5}).encode())
    next_state, action = EXPECTED_NEGOTIATION[(state, kind)]
    assert core.state is next_state
    assert core.events_enabled is (next_state is QMPState.COMMAND_MODE)
    if action == "accept_capabilities":
        assert item == Negotiated((), 5, b'{"return": {}, "id": 5}\r\n')
    elif action == "dispatch":
        assert item == Command("query-jobs", {}, 5)
    else:
        assert isinstance(item, Rejected) and isinstance(item.error, CommandNotFound)
        assert item.id == 5
        assert str(item.error) == (ALREADY if action == "refuse_already_negotiated"
                                   else "Expecting capabilities negotiation with 'qmp_capabilities'")


def test_failed_negotiation_stays_in_negotiation():
    core = QMPConnectionCore()  # offers nothing
    [item] = core.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}')
    assert str(item.error) == "Capability oob, oob not available"
    assert core.state is QMPState.CAPABILITIES_NEGOTIATION and not core.events_enabled
    [item] = core.receive_data(NEGOTIATE)
    assert isinstance(item, Negotiated) and core.state is QMPState.COMMAND_MODE


def test_oob_capability_enables_exec_oob():
    core = QMPConnectionCore(capabilities=["oob"])
    [item] = core.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert item.capabilities == ("oob",) and core.capabilities_enabled == {"oob"}
    assert core.receive_data(b'{"exec-oob": "x-ping", "id": 1}') == [Command("x-ping", {}, 1, oob=True)]
    [clash] = core.receive_data(b'{"execute": "a", "exec-oob": "b"}')
    assert str(clash.error) == "QMP input member 'exec-oob' clashes with 'execute'"


def test_unknown_capability_offer_is_refused():
    with pytest.raises(ValueError):
        QMPConnectionCore(capabilities=["telepathy"])


def test_arguments_are_passed_through_for_the_dispatcher():
    core = command_mode_core()
    [item] = core.receive_data(b'{"execute": "block-stream", "arguments": {"device": "top", "speed": 5}}')
    assert item == Command("block-stream", {"device": "top", "speed": 5})
    assert item.id is NO_ID


# --- id echo ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [None, 0, -1, 1.25, "a", "", [], {}, [1, "x", None], {"nested": {"k": [True]}},
                                        True, 18446744073709551615])
def test_id_is_echoed_in_success_and_error_replies(request_id):
    core = command_mode_core()
    [command] = core.receive_data(json.dumps({"execute": "x", "id": request_id}).encode())
    assert command.id == request_id
    assert json.loads(connection.reply_return(42, command.id)) == {"return": 42, "id": request_id}
    assert json.loads(connection.reply_exception(GenericError("no"), command.id)) == {
        "id": request_id, "error": {"class": "GenericError", "desc": "no"}}
    [rejected] = core.receive_data(json.dumps({"execute": "x", "id": request_id, "bogus": 1}).encode())
    assert json.loads(rejected.reply)["id"] == request_id


def test_missing_id_is_not_echoed_and_parse_errors_never_carry_one():
    core = command_mode_core()
    [command] = core.receive_data(b'{"execute": "x"}')
    assert command.id is NO_ID and not command.id
    assert connection.reply_return(None, command.id) == b'{"return": {}}\r\n'
    [rejected] = core.receive_data(b'{"execute": "x", "id": 1, }')
    assert rejected.id is NO_ID and b'"id"' not in rejected.reply


# --- serializers ------------------------------------------------------------------------------------------


# QEMU refuses Unicode's 66 noncharacters in input (util/unicode.c), so they cannot round-trip
qmp_text = st.text().filter(lambda s: not json_parser.NONCHARACTER.search(s))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | qmp_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(qmp_text.map(lambda s: s[:8]), children,
                                                                     max_size=4),
    max_leaves=25,
)


def parse_one(data: bytes):
    [item] = JSONStreamParser().feed(data + b"\n")
    assert isinstance(item, JSONValue), item
    return item.value


@HYPOTHESIS
@given(json_values)
def test_encode_round_trips_through_our_parser_and_json_module(value):
    text = encode_json(value)
    assert text.isascii()
    assert json.loads(text) == value
    # a NUL in a key is as far as QEMU's C strings go; values keep it
    assert parse_one(text.encode()) == value


@HYPOTHESIS
@given(qmp_text)
def test_strings_round_trip_with_qemu_escapes(text):
    encoded = encode_json(text)
    assert all(0x20 <= ord(ch) < 0x7F for ch in encoded)
    assert parse_one(encoded.encode()) == text
    assert parse_one(("'" + encoded[1:-1].replace("'", "\\'") + "'").encode()) == text


@HYPOTHESIS
@given(json_values)
def test_parser_agrees_with_json_module_on_valid_json(value):
    text = json.dumps(value, ensure_ascii=False)
    assert parse_one(text.encode()) == json.loads(text)


def test_serializers_end_in_crlf_and_round_trip():
    version = connection.make_version(7, 2, 22, "vdisk")
    assert connection.greeting(version, ["oob"]) == (
        b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "vdisk"}, '
        b'"capabilities": ["oob"]}}\r\n'
    )
    assert connection.reply_return([1, "x"], "id-1") == b'{"return": [1, "x"], "id": "id-1"}\r\n'
    assert connection.reply_return() == b'{"return": {}}\r\n'
    assert connection.reply_error("DeviceNotFound", "Device 'x' not found") == (
        b'{"error": {"class": "DeviceNotFound", "desc": "Device \'x\' not found"}}\r\n')
    assert connection.reply_error("GenericError", "e", None) == (
        b'{"id": null, "error": {"class": "GenericError", "desc": "e"}}\r\n')
    for message in (connection.greeting(version, []), connection.reply_return({"a": [1]}, 3),
                    connection.reply_error("GenericError", "x\u00e9", {"k": 1})):
        assert message.endswith(b"\r\n") and message.count(b"\n") == 1
        assert parse_one(message[:-2]) == json.loads(message)


def test_event_timestamp_comes_from_the_argument():
    message = connection.event("JOB_STATUS_CHANGE", {"status": "running", "id": "job0"}, 1796006781.824959)
    assert message == (
        b'{"timestamp": {"seconds": 1796006781, "microseconds": 824959}, "event": "JOB_STATUS_CHANGE", '
        b'"data": {"status": "running", "id": "job0"}}\r\n'
    )
    assert connection.event("STOP", None, 0.0) == (
        b'{"timestamp": {"seconds": 0, "microseconds": 0}, "event": "STOP"}\r\n')
    assert json.loads(connection.event("X", {}, 12.9999999))["timestamp"] == {"seconds": 13, "microseconds": 0}
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            connection.event("X", None, bad)


def test_reply_exception_maps_our_error_classes():
    from vdisk.errors import DeviceNotFound, StorageError

    assert json.loads(connection.reply_exception(DeviceNotFound("Device 'd' not found"), 1))["error"] == {
        "class": "DeviceNotFound", "desc": "Device 'd' not found"}
    assert connection.error_class_and_desc(StateError("bad state")) == ("GenericError", "bad state")
    assert connection.error_class_and_desc(StorageError("read failed", path="/x")) == ("GenericError", "/x: read failed")
    assert connection.error_class_and_desc(RuntimeError("boom")) == ("GenericError", "boom")
    assert str(connection.command_not_found("a\x00b")) == "The command a has not been found"


def test_encoder_refuses_what_json_cannot_say():
    with pytest.raises(TypeError):
        encode_json({1: "x"})
    with pytest.raises(TypeError):
        encode_json(object())
    assert encode_json(float("inf")) == "inf"  # what QEMU writes for a 1e400 it was sent
    assert encode_json(QMPState.COMMAND_MODE) == '"command_mode"'


# --- argument schemas -------------------------------------------------------------------------------------

ON_ERROR = EnumType("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto"))
STREAM_SCHEMA = {
    "*job-id": "str",
    "device": "str",
    "*base": "str",
    "*speed": "int",
    "*on-error": ON_ERROR,
    "*auto-finalize": "bool",
    "*filter": {"name": "str", "*opts": ["any"]},
    "*sizes": ["size"],
    "*ratio": "number",
}


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "Parameter 'device' is missing"),
    ({"speed": 1}, "Parameter 'device' is missing"),
    ({"device": 1}, "Invalid parameter type for 'device', expected: string"),
    ({"device": "d", "speed": "1"}, "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "d", "speed": 1.0}, "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "d", "speed": True}, "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "d", "speed": 1 << 63}, "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "d", "speed": None}, "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "d", "auto-finalize": 1}, "Invalid parameter type for 'auto-finalize', expected: boolean"),
    ({"device": "d", "on-error": "explode"}, "Parameter 'on-error' does not accept value 'explode'"),
    ({"device": "d", "on-error": 3}, "Invalid parameter type for 'on-error', expected: string"),
    ({"device": "d", "filter": []}, "Invalid parameter type for 'filter', expected: object"),
    ({"device": "d", "filter": {}}, "Parameter 'filter.name' is missing"),
    ({"device": "d", "filter": {"name": "n", "x": 1}}, "Parameter 'filter.x' is unexpected"),
    ({"device": "d", "filter": {"name": "n", "opts": {}}}, "Invalid parameter type for 'filter.opts', expected: array"),
    ({"device": "d", "sizes": [1, "2"]}, "Parameter 'sizes[1]' expects uint64"),
    ({"device": "d", "sizes": [1 << 64]}, "Parameter 'sizes[0]' expects uint64"),
    ({"device": "d", "ratio": "1"}, "Invalid parameter type for 'ratio', expected: number"),
    ({"device": "d", "x": 1}, "Parameter 'x' is unexpected"),
    ({"device": 5, "x": 1}, "Invalid parameter type for 'device', expected: string"),
])
def test_argument_errors_use_qemu_wording(arguments, message):
    with pytest.raises(InvalidArgument) as info:
        validate_arguments(STREAM_SCHEMA, arguments)
    assert str(info.value) == message
    assert info.value.qmp_class == "GenericError"


def test_valid_arguments_come_back_normalised():
    arguments = {"device": "top", "speed": -5, "on-error": "stop", "filter": {"name": "f", "opts": [None, {"a": 1}]},
                 "sizes": [0, -1, (1 << 64) - 1], "ratio": 2, "auto-finalize": False}
    checked = validate_arguments(STREAM_SCHEMA, arguments)
    assert checked == {**arguments, "sizes": [0, (1 << 64) - 1, (1 << 64) - 1], "ratio": 2.0}
    assert validate_arguments(STREAM_SCHEMA, {"device": "d"}) == {"device": "d"}
    assert validate_arguments({}, {}) == {}


def test_schema_mistakes_are_programming_errors():
    with pytest.raises(TypeError):
        validate_arguments({"a": "float64"}, {"a": 1})
    with pytest.raises(TypeError):
        validate_arguments({"a": ["str", "int"]}, {"a": []})


# --- a real client: qemu.qmp talks to the core through a socket loop --------------------------------------


def test_qemu_qmp_client_negotiates_executes_and_receives_events():
    qmp = pytest.importorskip("qemu.qmp")

    async def session(path: str) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            core = QMPConnectionCore()
            writer.write(connection.greeting(connection.make_version(8, 0, 0, "vdisk-test"), core.capabilities_offered))
            while data := await reader.read(4096):
                for item in core.receive_data(data):
                    if not isinstance(item, Command):
                        writer.write(item.reply)
                    elif item.name == "echo":
                        writer.write(connection.reply_return(item.arguments, item.id))
                        if core.events_enabled:
                            writer.write(connection.event("ECHOED", {"n": len(item.arguments)}, 1.5))
                    else:
                        writer.write(dispatch_stub(item))
                await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        client = qmp.QMPClient("vdisk-test")
        try:
            await client.connect(path)
            assert client.greeting.QMP.version["qemu"] == {"micro": 0, "minor": 0, "major": 8}
            with client.listener() as listener:
                assert await client.execute("echo", {"a": [1, "\u00e9"]}) == {"a": [1, "\u00e9"]}
                received = await asyncio.wait_for(listener.get(), 5)
            assert received["event"] == "ECHOED" and received["data"] == {"n": 1}
            assert received["timestamp"] == {"seconds": 1, "microseconds": 500000}
            with pytest.raises(qmp.ExecuteError) as info:
                await client.execute("nope")
            assert info.value.error_class == "CommandNotFound"
            assert str(info.value) == "The command nope has not been found"
        finally:
            await client.disconnect()
            server.close()
            await server.wait_closed()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(asyncio.wait_for(session(os.path.join(tmp, "qmp.sock")), 30))


# --- QEMU as the oracle -----------------------------------------------------------------------------------

QSD = shutil.which("qemu-storage-daemon")


@pytest.fixture(scope="module")
def qsd_socket():
    if QSD is None:
        pytest.skip("qemu-storage-daemon not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [QSD, "--chardev", f"socket,path={path},server=on,wait=off,id=m0", "--monitor", "chardev=m0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            while not Path(path).exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"qemu-storage-daemon did not start: {proc.stderr.read()!r}")
                time.sleep(0.02)
            yield path
        finally:
            proc.kill()
            proc.wait()


def qemu_replies(path: str, data: bytes) -> bytes:
    """Send ``data`` then the sentinel on a fresh connection; everything QEMU answered before the sentinel."""
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock.settimeout(20)
        deadline = time.monotonic() + 20
        while True:
            try:
                sock.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        buffer = b""
        while not buffer.endswith(b"\r\n"):
            buffer += sock.recv(65536)
        assert buffer.startswith(b'{"QMP": ')
        sock.sendall(data + SENTINEL)
        buffer = b""
        while not buffer.endswith(SENTINEL_REPLY):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed, got {buffer!r}"
            buffer += chunk
        return buffer[:-len(SENTINEL_REPLY)]


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=CASE_IDS)
def test_replies_match_qemu(qsd_socket, name, data, expected):
    theirs = qemu_replies(qsd_socket, data)
    assert theirs.startswith(expected)
    assert run(data + SENTINEL, **OOB) == theirs + SENTINEL_REPLY
