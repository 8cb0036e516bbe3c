"""Issue 18, failure 1: whatever the server answers, ``probe.step()`` never raises and the
model is untouched. A real probe talks real HTTP to a hostile local server that answers the
command poll, the registration and the acks with garbage: wrong shapes and types, non-JSON,
truncated, huge, nested deep, commands with missing or absurd fields."""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers.hostile_server import Answer, hostile_server
from helpers.probe_harness import all_finite, probe_on, unchanged, wait_for_polls, weights
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rankguard.probe.http_transport import HttpTransport

# The answers the issue found crashing training, and their relatives.
MALFORMED_CLAIMS: list[Any] = [
    {"data": ["x"]},
    {"data": "abc"},
    [1, 2],
    {"data": [None]},
    {"data": [{"kind": "msign"}]},  # no id
    {"data": [{"id": {"nested": 1}, "kind": "undo"}]},  # an id that is no id
    {"data": [{"id": "a/../../b", "kind": "undo"}]},  # an id that is a path
    {"data": [{"id": "c1", "kind": "pss", "args": {"scale": "NaN"}}]},
    {"data": [{"id": "c2", "kind": "pss", "args": {"k": 10**40}}]},
    {"data": [{"id": "c3", "kind": "set_probe", "args": {"every": 10**30}}]},
    {"data": [{"id": "c4", "kind": "msign", "args": ["attention"]}]},
    {"data": [{"id": "c5", "kind": ["msign"]}]},
    {"data": {"id": "c6"}},
    {"data": None},
    "data",
    7,
    None,
]
RAW_CLAIMS: list[bytes] = [
    b"",
    b"not json",
    b'{"data": [{"id": "c7", "kind": "msign"',  # truncated
    b"[" * 100_000,  # deeper than any parser's recursion
    b'{"data": [' + b"1" * 5_000 + b"]}",  # an integer past Python's digit limit
    b'{"data": [{"id": NaN, "kind": Infinity}]}',
    b"\xff\xfe\x00garbage",
    json.dumps({"data": [{"id": "c8", "kind": "undo"}] * 20_000}).encode(),  # 700 kB
    json.dumps({"data": [{"id": "c9", "kind": "msign"}] * 60_000}).encode(),  # 1.8 MB: unread
]


def _label(value: object) -> str:
    """A short test id (some answers are hundreds of kB)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


def _claim_answered_by(server: Any, answer: Answer) -> None:
    server.answer("/commands/claim", answer)


@pytest.mark.parametrize("body", MALFORMED_CLAIMS + RAW_CLAIMS, ids=_label)
def test_a_malformed_command_poll_never_reaches_training(tmp_path: Path, body: Any) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        reference = weights(model)
        _claim_answered_by(server, Answer(200, body))
        wait_for_polls(server)
        for _ in range(3):
            probe.step(1.0)  # must not raise
        assert unchanged(model, reference)


def test_truncated_hanging_and_reset_polls_never_reach_training(tmp_path: Path) -> None:
    claim = json.dumps({"data": [{"id": "t1", "kind": "msign"}]}).encode()
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        reference = weights(model)
        for answer in (
            Answer(200, claim, truncate=True),
            Answer(200, claim, reset=True),
            Answer(200, claim, headers={"Content-Encoding": "gzip"}),  # says gzip, is not
        ):
            _claim_answered_by(server, answer)
            wait_for_polls(server)
            probe.step(1.0)
        assert unchanged(model, reference)


def test_a_trickling_reply_is_cut_off_and_sending_goes_on(tmp_path: Path) -> None:
    claim = json.dumps({"data": [{"id": "slow", "kind": "msign"}]}).encode()  # 44 bytes
    with hostile_server() as server:
        server.answer("/commands/claim", Answer(200, claim, trickle=0.1))  # 4.4 s to send
        transport = HttpTransport(
            server.url,
            token=None,
            registration={"id": str(uuid.uuid4()), "name": "trickle"},
            spill_path=tmp_path / "spill.jsonl",
            poll_interval=0.01,
            retry_interval=0.01,
            request_seconds=1.0,
        )
        server.wait_for(lambda: len(server.seen("/commands/claim")) >= 2, timeout=10)
        assert transport.take_commands() == []  # the first reply was cut off after 1 s
        server.answer("/commands/claim", Answer(200, {"data": []}))
        points = {"quantity": ["loss"], "target": ["global"], "rank": [0], "step": [0]}
        transport.send({"v": 1, "points": points | {"wall_time": [0.0], "value": [1.0]}})
        report = transport.close(timeout=10)
    assert report.delivered_all and server.steps() == [0]
    assert transport.stats().failed_requests >= 1


def test_a_failing_endpoint_starves_neither_the_poll_nor_the_data(tmp_path: Path) -> None:
    """Acks answered 500 forever must not stop the command poll; a claim answered 500
    forever must not stop the data. Each kind of call backs off on its own."""
    with hostile_server() as server:
        server.answer("/ack", Answer(500, {"detail": "ack store broken"}))
        transport = HttpTransport(
            server.url,
            token=None,
            registration={"id": str(uuid.uuid4()), "name": "starve"},
            spill_path=tmp_path / "spill.jsonl",
            poll_interval=0.01,
            retry_interval=0.2,
        )
        transport.ack("c1", {"state": "applied", "step": 1})
        server.wait_for(lambda: len(server.seen("/ack")) >= 3)
        polls = len(server.seen("/commands/claim"))
        server.wait_for(lambda: len(server.seen("/commands/claim")) >= polls + 3)
        server.answer("/ack", Answer(200, {}))
        server.answer("/commands/claim", Answer(500, {"detail": "claims broken"}))
        points = {"quantity": ["loss"], "target": ["global"], "rank": [0], "step": [0]}
        transport.send({"v": 1, "points": points | {"wall_time": [0.0], "value": [1.0]}})
        server.wait_for(lambda: server.steps() == [0])
        assert transport.close(timeout=10).delivered_all


def test_a_bad_poll_is_logged_once_not_once_per_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, _):
        _claim_answered_by(server, Answer(200, {"data": "abc"}))
        with caplog.at_level(logging.WARNING, logger="rankguard.probe"):
            wait_for_polls(server, n=20)
            probe.step(1.0)
    about_claims = [r for r in caplog.records if "claim" in r.getMessage()]
    assert len(about_claims) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    "body",
    [b"", b"[1, 2]", b'{"job_token": 7}', b'{"job_token": "a\\r\\nX-Evil: 1"}', b"\xff"],
    ids=_label,
)
def test_a_malformed_registration_reply_is_ignored(tmp_path: Path, body: bytes) -> None:
    with hostile_server() as server:
        server.answer("/api/v1/runs", Answer(201, body))
        with probe_on(server, tmp_path) as (probe, model):
            reference = weights(model)
            wait_for_polls(server)
            probe.step(1.0)
            assert unchanged(model, reference)
        # the probe kept the token it was given
        claims = server.seen("/commands/claim")
        assert claims and all(r.headers["Authorization"] == "Bearer rg_given-token" for r in claims)


def test_a_malformed_ack_reply_is_ignored(tmp_path: Path) -> None:
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, _):
        server.answer("/ack", Answer(200, b"[" * 50_000, truncate=True))
        _claim_answered_by(server, Answer(200, {"data": [{"id": "u1", "kind": "undo"}]}))
        wait_for_polls(server)
        _claim_answered_by(server, Answer(200, {"data": []}))
        probe.step(1.0)  # applies (fails: nothing to undo) and acks
        server.wait_for(lambda: bool(server.seen("/u1/ack")))
        probe.step(1.0)
        assert probe.command_log()["u1"]["state"] == "failed"


# -- property: random answers ---------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "1e39", "attention", "all_2d"])
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_arg_names = st.sampled_from(
    [
        *("targets", "engine", "snapshot", "variant", "k", "scale", "temperature"),
        *("every", "enable", "disable", "factor", "extra"),
    ]
)
_command = st.fixed_dictionaries(
    {
        "id": st.text(max_size=6) | _json,
        "kind": st.sampled_from(["msign", "pss", "undo", "set_probe", "scale_lr", "rm"]) | _json,
    },
    optional={"args": st.dictionaries(_arg_names, _json, max_size=4) | _json},
)
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({"data": st.lists(_command | _json, max_size=4)}),
    st.lists(_command, max_size=3),
)
_raw = st.one_of(
    _bodies.map(lambda body: json.dumps(body, allow_nan=True).encode()),
    _bodies.map(lambda body: json.dumps(body, allow_nan=True).encode()[:-3]),  # truncated
    st.binary(max_size=64),
)
_status = st.sampled_from([200, 200, 200, 201, 204, 400, 404, 409, 429, 500])


@pytest.mark.slow
def test_random_answers_never_raise_into_training(tmp_path: Path) -> None:
    """Hypothesis picks the claim and ack answers; after each the probe takes a step. The
    weights change only where the probe itself acked a rewrite (or an undo) as applied, and
    stay finite."""
    with hostile_server() as server, probe_on(server, tmp_path) as (probe, model):
        state = {"reference": weights(model), "applied": 0}

        @given(claim=_raw, claim_status=_status, ack=_raw, ack_status=_status)
        @example(b'{"data": ["x"]}', 200, b"", 200)
        @example(b'{"data": "abc"}', 200, b"", 200)
        @example(b"[1, 2]", 200, b"", 200)
        @example(b'{"data": [null]}', 200, b"", 200)
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        def check(claim: bytes, claim_status: int, ack: bytes, ack_status: int) -> None:
            server.answer("/ack", Answer(ack_status, ack))
            _claim_answered_by(server, Answer(claim_status, claim))
            wait_for_polls(server)
            probe.step(1.0)  # must not raise
            assert all_finite(model)
            # what may change the weights: an applied msign/pss ("matrices") or undo
            rewrites = sum(
                1
                for ack_ in probe.command_log().values()
                if ack_["state"] == "applied"
                and {"matrices", "restored"} & set(ack_.get("result") or {})
            )
            if rewrites == state["applied"]:
                assert unchanged(model, state["reference"])
            state["applied"] = rewrites
            state["reference"] = weights(model)

        check()
        assert math.isfinite(probe.latest().get(("loss", "global"), 1.0))
