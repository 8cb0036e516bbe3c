"""Webhook payloads, HMAC signing, delivery against a real local HTTP server, inbound parsing."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from rankguard.server import inbound
from rankguard.server.alerts import Rule, Transition, evaluate, flush, runbook
from rankguard.server.notify import delivery, payloads, signing
from rankguard.server.vocab import WebhookFormat

START = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
END = datetime(2025, 3, 1, 12, 30, 0, tzinfo=timezone.utc)


def transitions() -> list[Transition]:
    rule = Rule(
        name="sa_sign_diversity_collapse",
        quantity="sa_sign_diversity",
        condition="below",
        threshold=0.1,
        severity="critical",
    )
    samples = [
        ("transformer.h.3.attn.c_attn.weight[q]", 0, 0.5),
        ("transformer.h.1.mlp.c_fc.weight", 0, 0.5),
        ("transformer.h.3.attn.c_attn.weight[q]", 10, 0.04),
        ("transformer.h.1.mlp.c_fc.weight", 10, 0.5),
        ("transformer.h.3.attn.c_attn.weight[q]", 20, math.nan),
        ("transformer.h.1.mlp.c_fc.weight", 20, 0.02),
        ("transformer.h.3.attn.c_attn.weight[q]", 30, 0.5),
        ("transformer.h.1.mlp.c_fc.weight", 30, 0.5),
    ]
    state, out = evaluate(rule, None, samples)
    _, rest = flush(rule, state)
    # As the service hands them over: the suggested action completed for the run.
    action = runbook.suggested_action(rule, "run-42")
    return [dataclasses.replace(t, suggested_action=action) for t in out + rest]


def notices() -> tuple[payloads.AlertNotice, payloads.AlertNotice]:
    firing, resolved = transitions()
    common: dict[str, Any] = {
        "alert_id": "a-17",
        "run_id": "run-42",
        "run_name": "gpt-lr3e-3",
        "project": "demo",
        "starts_at": START,
        "base_url": "https://rg.example/",
    }
    return (
        payloads.notice_from_transition(firing, **common),
        payloads.notice_from_transition(resolved, ends_at=END, **common),
    )


# -- outbound payloads -------------------------------------------------------------------------


def test_notice_carries_the_action_and_links() -> None:
    firing, _ = notices()
    assert "{run_id}" not in firing.suggested_action
    assert "POST /api/v1/runs/run-42/commands" in firing.suggested_action
    assert firing.links["run"] == "https://rg.example/runs/run-42"
    assert firing.links["incident"] == "https://rg.example/incidents/a-17"
    assert [t.target for t in firing.targets] == ["transformer.h.3.attn.c_attn.weight[q]"]


def test_generic_payload_shape() -> None:
    firing, resolved = notices()
    body = json.loads(payloads.render("json", firing))
    assert body["status"] == "firing" and body["alert_id"] == "a-17"
    assert body["rule"] == "sa_sign_diversity_collapse" and body["severity"] == "critical"
    assert body["run"] == {"id": "run-42", "name": "gpt-lr3e-3", "project": "demo"}
    assert body["first_step"] == 10 and body["step"] == 10
    assert body["targets"] == [
        {"target": "transformer.h.3.attn.c_attn.weight[q]", "value": 0.04, "since": 10}
    ]
    assert "POST /api/v1/runs/run-42/commands" in body["suggested_action"]
    assert "sa_sign_diversity_collapse" in body["message"] and "0.04 < 0.1" in body["message"]
    assert body["starts_at"] == "2025-03-01T12:00:00Z" and body["ends_at"] is None
    assert set(body["links"]) == {"incident", "run", "alert", "commands"}
    done = json.loads(payloads.render("json", resolved))
    assert done["status"] == "resolved" and done["ends_at"] == "2025-03-01T12:30:00Z"
    assert done["step"] == 30 and done["first_step"] == 10


def test_payloads_carry_nan_as_contract_string() -> None:
    notice = payloads.AlertNotice(
        alert_id="x",
        status="firing",
        rule="loss_non_finite",
        quantity="loss",
        severity="critical",
        run_id="r",
        first_step=5,
        step=5,
        message="loss is NaN",
        suggested_action="stop",
        targets=(payloads.NoticeTarget("global", math.nan, 5),),
    )
    for fmt in WebhookFormat:
        raw = payloads.render(fmt, notice)
        json.loads(raw)  # strict JSON: no NaN literal
        assert b"NaN" in raw
    assert json.loads(payloads.render("json", notice))["targets"][0]["value"] == "NaN"


def test_slack_payload_shape() -> None:
    firing, resolved = notices()
    body = json.loads(payloads.render(WebhookFormat.SLACK, firing))
    assert set(body) == {"text", "blocks"}
    assert "CRITICAL" in body["text"] and "gpt-lr3e-3" in body["text"]
    types = [b["type"] for b in body["blocks"]]
    assert types[0] == "header" and "context" in types
    assert body["blocks"][0]["text"]["type"] == "plain_text"
    assert len(body["blocks"][0]["text"]["text"]) <= 150  # Slack's header limit
    text = json.dumps(body["blocks"])
    assert "transformer.h.3.attn.c_attn.weight[q]" in text and "Suggested action" in text
    done = json.loads(payloads.render("slack", resolved))
    assert "RESOLVED" in done["text"] and "Suggested action" not in json.dumps(done["blocks"])


def test_alertmanager_payload_shape() -> None:
    firing, resolved = notices()
    body = json.loads(
        payloads.render("alertmanager", firing, receiver="ops", external_url="https://rg.example")
    )
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "ops"
    assert body["externalURL"] == "https://rg.example"
    for key in ("groupKey", "groupLabels", "commonLabels", "commonAnnotations", "truncatedAlerts"):
        assert key in body
    (alert,) = body["alerts"]
    assert set(alert) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    assert alert["labels"] == {
        "alertname": "sa_sign_diversity_collapse",
        "severity": "critical",
        "run": "run-42",
        "quantity": "sa_sign_diversity",
        "project": "demo",
    }
    assert {"summary", "description", "runbook"} <= set(alert["annotations"])
    assert alert["startsAt"] == "2025-03-01T12:00:00Z" and alert["endsAt"] == payloads.ZERO_TIME
    assert len(alert["fingerprint"]) == 16
    assert body["groupLabels"] == {"alertname": "sa_sign_diversity_collapse", "run": "run-42"}
    done = json.loads(payloads.render("alertmanager", resolved))
    assert done["status"] == "resolved" and done["alerts"][0]["endsAt"] == "2025-03-01T12:30:00Z"
    # the same alert keeps its fingerprint across firing and resolved
    assert done["alerts"][0]["fingerprint"] == alert["fingerprint"]


def test_alertmanager_groups_several_alerts() -> None:
    firing, _ = notices()
    other = payloads.AlertNotice(
        **{**firing.__dict__, "rule": "stable_rank_collapse", "quantity": "stable_rank"}
    )
    body = payloads.alertmanager_payload([firing, other])
    assert len(body["alerts"]) == 2 and body["status"] == "firing"
    assert "alertname" not in body["commonLabels"] and body["commonLabels"]["run"] == "run-42"
    assert body["groupLabels"] == {"run": "run-42"}
    with pytest.raises(ValueError, match="notices"):
        payloads.alertmanager_payload([])


def test_render_rejects_unknown_format() -> None:
    firing, _ = notices()
    with pytest.raises(ValueError, match="format='xml' is not valid"):
        payloads.render("xml", firing)


# -- signing -----------------------------------------------------------------------------------


def test_signature_verifies_and_binds_body_secret_and_timestamp() -> None:
    body = b'{"a":1}'
    headers = signing.signature_headers(body, "s3cret", 1_700_000_000)
    sig, ts = headers[signing.SIGNATURE_HEADER], headers[signing.TIMESTAMP_HEADER]
    assert sig.startswith("sha256=") and len(sig) == len("sha256=") + 64
    now = 1_700_000_010.0
    assert signing.verify_signature(body, "s3cret", sig, ts, now=now)
    assert not signing.verify_signature(b'{"a":2}', "s3cret", sig, ts, now=now)
    assert not signing.verify_signature(body, "other", sig, ts, now=now)
    assert not signing.verify_signature(
        body, "s3cret", sig, "1700000001", now=now
    )  # timestamp is signed
    assert not signing.verify_signature(body, "s3cret", sig, ts, now=now + 3600)  # replay, too old
    assert not signing.verify_signature(body, "s3cret", None, ts, now=now)
    assert not signing.verify_signature(body, "s3cret", sig, "soon", now=now)


def test_signature_matches_an_independent_hmac() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"42.body", hashlib.sha256).hexdigest()
    assert signing.sign(b"body", "k", 42) == f"sha256={expected}"


# -- delivery against a real HTTP server ------------------------------------------------------


class _Recorder:
    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()


@contextmanager
def http_server(script: list[tuple[int, dict[str, str]]]) -> Iterator[tuple[str, _Recorder]]:
    """A real server on 127.0.0.1:<free port> answering each POST with the next scripted status."""
    recorder = _Recorder(script)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with recorder.lock:
                index = len(recorder.requests)
                recorder.requests.append((dict(self.headers), body))
                status, headers = recorder.script[min(index, len(recorder.script) - 1)]
            payload = b"ok" if status < 300 else b"nope"
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def fake_time() -> tuple[list[float], Any, Any]:
    """A clock that advances only when ``sleep`` is called; the sleeps are recorded."""
    now = [1_700_000_000.0]
    sleeps: list[float] = []

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    return sleeps, clock, sleep


def test_retries_twice_then_delivers_signed() -> None:
    firing, _ = notices()
    body = payloads.render("json", firing)
    sleeps, clock, sleep = fake_time()
    policy = delivery.RetryPolicy(max_attempts=5, base_delay_s=2.0, jitter=0.5)
    with http_server([(503, {}), (502, {}), (200, {})]) as (url, rec), httpx.Client() as client:
        result = delivery.deliver(
            client,
            url,
            body,
            secret="s3cret",
            policy=policy,
            sleep=sleep,
            clock=clock,
            rng=lambda: 1.0,
        )
    assert result.delivered
    assert [(a.attempt, a.status_code, a.outcome) for a in result.attempts] == [
        (1, 503, "retry"),
        (2, 502, "retry"),
        (3, 200, "delivered"),
    ]
    # exponential backoff 2, 4 scaled by (1 - jitter * rng) = 0.5
    assert sleeps == [1.0, 2.0] and [a.delay_s for a in result.attempts[:2]] == [1.0, 2.0]
    assert len(rec.requests) == 3
    for headers, raw in rec.requests:
        assert raw == body
        assert signing.verify_signature(
            raw,
            "s3cret",
            headers[signing.SIGNATURE_HEADER],
            headers[signing.TIMESTAMP_HEADER],
            now=clock(),
        )
        assert headers["Content-Type"] == "application/json"
    # each retry is signed with its own timestamp
    assert len({h[signing.TIMESTAMP_HEADER] for h, _ in rec.requests}) == 3
    json.dumps([a.to_dict() for a in result.attempts], allow_nan=False)


def test_client_error_is_not_retried() -> None:
    sleeps, clock, sleep = fake_time()
    with http_server([(400, {}), (200, {})]) as (url, rec), httpx.Client() as client:
        result = delivery.deliver(client, url, b"{}", sleep=sleep, clock=clock)
    assert not result.delivered
    assert [(a.status_code, a.outcome) for a in result.attempts] == [(400, "failed")]
    assert "HTTP 400" in (result.attempts[0].error or "")
    assert len(rec.requests) == 1 and sleeps == []


def test_429_respects_retry_after_seconds() -> None:
    sleeps, clock, sleep = fake_time()
    with (
        http_server([(429, {"Retry-After": "7"}), (200, {})]) as (url, _),
        httpx.Client() as client,
    ):
        result = delivery.deliver(client, url, b"{}", sleep=sleep, clock=clock, rng=lambda: 0.0)
    assert result.delivered and sleeps == [7.0]


def test_retry_after_http_date_is_honoured() -> None:
    sleeps, clock, sleep = fake_time()
    when = format_datetime(datetime.fromtimestamp(clock() + 12, tz=timezone.utc), usegmt=True)
    with (
        http_server([(503, {"Retry-After": when}), (200, {})]) as (url, _),
        httpx.Client() as client,
    ):
        result = delivery.deliver(client, url, b"{}", sleep=sleep, clock=clock)
    assert result.delivered and sleeps == [12.0]


def test_retry_after_beyond_max_delay_gives_up() -> None:
    sleeps, clock, sleep = fake_time()
    policy = delivery.RetryPolicy(max_delay_s=30.0)
    with http_server([(429, {"Retry-After": "3600"})]) as (url, rec), httpx.Client() as client:
        result = delivery.deliver(client, url, b"{}", policy=policy, sleep=sleep, clock=clock)
    assert not result.delivered and len(rec.requests) == 1 and sleeps == []


def test_attempts_and_total_time_are_bounded() -> None:
    sleeps, clock, sleep = fake_time()
    policy = delivery.RetryPolicy(max_attempts=4, base_delay_s=1.0, jitter=0.0, max_total_s=100.0)
    with http_server([(500, {})]) as (url, rec), httpx.Client() as client:
        result = delivery.deliver(client, url, b"{}", policy=policy, sleep=sleep, clock=clock)
    assert [a.outcome for a in result.attempts] == ["retry", "retry", "retry", "failed"]
    assert sleeps == [1.0, 2.0, 4.0] and len(rec.requests) == 4

    sleeps, clock, sleep = fake_time()
    tight = delivery.RetryPolicy(max_attempts=10, base_delay_s=1.0, jitter=0.0, max_total_s=5.0)
    with http_server([(500, {})]) as (url, rec), httpx.Client() as client:
        result = delivery.deliver(client, url, b"{}", policy=tight, sleep=sleep, clock=clock)
    # waits 1 and 2 (total 3); the next wait of 4 would end past 5 s
    assert sleeps == [1.0, 2.0] and len(result.attempts) == 3 and not result.delivered


def test_connection_errors_are_retried() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps, clock, sleep = fake_time()
    policy = delivery.RetryPolicy(max_attempts=3, base_delay_s=0.5, jitter=0.0, timeout_s=2.0)
    with httpx.Client() as client:
        result = delivery.deliver(
            client, f"http://127.0.0.1:{port}/hook", b"{}", policy=policy, sleep=sleep, clock=clock
        )
    assert not result.delivered
    assert [a.outcome for a in result.attempts] == ["retry", "retry", "failed"]
    assert all(a.status_code is None and "ConnectError" in (a.error or "") for a in result.attempts)
    assert sleeps == [0.5, 1.0]


def test_retry_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        delivery.RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        delivery.RetryPolicy(jitter=2.0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("5", 5.0), (None, None), ("", None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert delivery.parse_retry_after(header, now=1_700_000_000.0) == expected


# -- inbound -----------------------------------------------------------------------------------

ALERTMANAGER_INBOUND = {
    "receiver": "rankguard",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "RankguardStableRankCollapse",
                "instance": "trainer-0:9100",
                "rankguard_run": "3f1c2a9e-7d7b-4f0e-9a51-0c1d2e3f4a5b",
                "rankguard_action": "msign",
                "severity": "critical",
            },
            "annotations": {"summary": "stable rank halved", "rankguard_targets": "attention"},
            "startsAt": "2025-03-01T12:00:00.000Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
            "fingerprint": "c3b0a0e8f1e2d3c4",
        },
        {
            "status": "resolved",
            "labels": {
                "alertname": "RankguardGradNormSpike",
                "run": "other-run",
                "severity": "warning",
            },
            "annotations": {"summary": "grad spike"},
            "startsAt": "2025-03-01T11:00:00Z",
            "endsAt": "2025-03-01T11:05:00Z",
            "generatorURL": "http://prometheus:9090/graph",
            "fingerprint": "0a1b2c3d4e5f6a7b",
        },
    ],
    "groupLabels": {"alertname": "RankguardStableRankCollapse"},
    "commonLabels": {"job": "rankguard"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "version": "4",
    "groupKey": '{}:{alertname="RankguardStableRankCollapse"}',
    "truncatedAlerts": 0,
}

GRAFANA_UNIFIED_INBOUND = {
    "receiver": "rankguard-contact-point",
    "status": "firing",
    "orgId": 1,
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "SA sign diversity low",
                "grafana_folder": "rankguard",
                "run": "run-42",
                "rankguard_action": "MSign",
            },
            "annotations": {"summary": "D < 0.1"},
            "startsAt": "2025-03-01T12:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://grafana:3000/alerting/grafana/abc/view",
            "fingerprint": "57c6d9296de2ad39",
            "silenceURL": "http://grafana:3000/alerting/silence/new",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 0.04, "C": 1},
            "valueString": "[ var='B' labels={} value=0.04 ]",
        }
    ],
    "groupLabels": {"alertname": "SA sign diversity low"},
    "commonLabels": {"alertname": "SA sign diversity low", "run": "run-42"},
    "commonAnnotations": {"summary": "D < 0.1"},
    "externalURL": "http://grafana:3000/",
    "version": "1",
    "groupKey": '{}:{alertname="SA sign diversity low"}',
    "truncatedAlerts": 0,
    "title": "[FIRING:1] SA sign diversity low",
    "state": "alerting",
    "message": "**Firing**",
}

GRAFANA_LEGACY_INBOUND = {
    "dashboardId": 1,
    "evalMatches": [{"value": 1.2, "metric": "rankguard_run_quantity", "tags": {}}],
    "message": "a*M above 1",
    "orgId": 1,
    "panelId": 2,
    "ruleId": 1,
    "ruleName": "Jacobian gain",
    "ruleUrl": "http://grafana:3000/d/abc",
    "state": "alerting",
    "tags": {"run": "run-7", "rankguard_action": "msign", "rankguard_engine": "newton_schulz"},
    "title": "[Alerting] Jacobian gain",
}


def test_parse_alertmanager_inbound() -> None:
    alerts = inbound.parse_inbound(ALERTMANAGER_INBOUND)
    assert [(a.alertname, a.status) for a in alerts] == [
        ("RankguardStableRankCollapse", "firing"),
        ("RankguardGradNormSpike", "resolved"),
    ]
    first, second = alerts
    assert first.labels["job"] == "rankguard"  # common labels merged in
    assert first.run_id == "3f1c2a9e-7d7b-4f0e-9a51-0c1d2e3f4a5b" and first.wants_msign
    assert second.run_id == "other-run" and not second.wants_msign
    assert inbound.inbound_command(first) == {
        "run_id": "3f1c2a9e-7d7b-4f0e-9a51-0c1d2e3f4a5b",
        "kind": "msign",
        "args": {"targets": "attention", "engine": "svd"},
    }
    assert inbound.inbound_command(second) is None


def test_parse_grafana_unified_inbound() -> None:
    (alert,) = inbound.parse_inbound(GRAFANA_UNIFIED_INBOUND)
    assert alert.alertname == "SA sign diversity low" and alert.status == "firing"
    assert alert.fingerprint == "57c6d9296de2ad39"
    assert inbound.inbound_command(alert) == {
        "run_id": "run-42",
        "kind": "msign",
        "args": {"targets": "all_2d", "engine": "svd"},
    }


def test_parse_grafana_legacy_inbound() -> None:
    (alert,) = inbound.parse_inbound(GRAFANA_LEGACY_INBOUND)
    assert (alert.alertname, alert.status, alert.run_id) == ("Jacobian gain", "firing", "run-7")
    command = inbound.inbound_command(alert)
    assert command is not None and command["args"]["engine"] == "newton_schulz"
    ok = inbound.parse_inbound({**GRAFANA_LEGACY_INBOUND, "state": "ok"})
    assert ok[0].status == "resolved" and inbound.inbound_command(ok[0]) is None


def test_our_own_alertmanager_payload_parses_back() -> None:
    firing, _ = notices()
    (alert,) = inbound.parse_inbound(json.loads(payloads.render("alertmanager", firing)))
    assert alert.alertname == "sa_sign_diversity_collapse" and alert.run_id == "run-42"
    assert inbound.inbound_command(alert) is None  # no rankguard_action: nothing is ordered


def test_inbound_glob_targets() -> None:
    alert = inbound.InboundAlert(
        "x",
        "firing",
        {"run": "r", "rankguard_action": "msign", "rankguard_targets": "h.0.*, h.1.*"},
    )
    assert inbound.inbound_command(alert) == {
        "run_id": "r",
        "kind": "msign",
        "args": {"targets": ["h.0.*", "h.1.*"], "engine": "svd"},
    }


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([1], "payload=list"),
        ({"alerts": "x"}, "alerts="),
        ({"alerts": [{"status": "firing", "labels": {}}]}, "alertname is missing"),
        ({"alerts": [{"status": "pending", "labels": {"alertname": "a"}}]}, "status='pending'"),
        ({"alerts": [{"status": "firing", "labels": ["a"]}]}, r"alerts\[0\].labels"),
        ({"hello": 1}, "expected an Alertmanager"),
    ],
)
def test_inbound_errors_name_the_field(payload: Any, match: str) -> None:
    with pytest.raises(inbound.InboundPayloadError, match=match):
        inbound.parse_inbound(payload)


def test_inbound_bad_engine_is_an_error() -> None:
    alert = inbound.InboundAlert(
        "x", "firing", {"run": "r", "rankguard_action": "msign", "rankguard_engine": "qr"}
    )
    with pytest.raises(inbound.InboundPayloadError, match="rankguard_engine='qr'"):
        inbound.inbound_command(alert)
