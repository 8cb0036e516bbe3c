"""The server's vocabularies: severity order, and agreement with the probe's own copies (the
probe must not import the server, so this test is what keeps the two in step)."""

from __future__ import annotations

from rankguard.probe import control, targets
from rankguard.probe.interventions import msign
from rankguard.server.vocab import (
    AlertSeverity,
    CommandKind,
    CommandState,
    EventKind,
    MSignEngine,
    TargetGroup,
    values,
)


def test_severity_order() -> None:
    assert [s.order for s in AlertSeverity] == [0, 1, 2]
    assert AlertSeverity.INFO.order < AlertSeverity.WARNING.order < AlertSeverity.CRITICAL.order
    assert AlertSeverity.order_of("critical") == 2 and AlertSeverity.order_of("unknown") == 0


def test_command_vocabulary_matches_the_probe() -> None:
    assert set(values(CommandKind)) == {k.value for k in control.CommandKind}
    assert set(values(MSignEngine)) == {e.value for e in msign.Engine}
    assert set(values(TargetGroup)) <= {targets.ATTENTION, targets.ALL_2D}


def test_every_command_state_has_an_event_kind() -> None:
    for state in CommandState:
        assert EventKind.for_command(state).value == f"command_{state.value}"
