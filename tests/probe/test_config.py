"""ProbeConfig: the one place the probe's options live; frozen, validated, all reachable."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from rankguard.probe import Probe, ProbeConfig, RecoveryConfig
from rankguard.probe.exceptions import ConfigError, ConfigTypeError
from rankguard.probe.sink import MemorySink


def test_defaults_are_resolved_at_construction() -> None:
    config = ProbeConfig(every=7)
    assert config.jacobian_every == 70
    assert config.command_every == 7
    assert ProbeConfig(every=7, jacobian_every=9, command_every=3).jacobian_every == 9


def test_options_derive_the_cadences_again() -> None:
    assert ProbeConfig().with_options({"every": 5}) == ProbeConfig(every=5)
    given = ProbeConfig(jacobian_every=7).with_options({"every": 5})
    assert (given.jacobian_every, given.command_every) == (7, 5)


def test_frozen_and_replaced_not_mutated() -> None:
    config = ProbeConfig(targets="*attn*", schedules={"stable_rank": 5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.every = 3  # type: ignore[misc]
    assert config.targets == ("*attn*",)
    faster = dataclasses.replace(config, every=5)
    assert (faster.every, faster.jacobian_every, config.every) == (5, 500, 50)
    assert faster.schedules == {"stable_rank": 5}


def test_schedules_are_copied() -> None:
    schedules = {"stable_rank": 5}
    config = ProbeConfig(schedules=schedules)
    schedules["stable_rank"] = 6
    assert config.schedules == {"stable_rank": 5}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"quantities": {"stable_rank": 5}}, ConfigTypeError, r"quantities:.*schedules="),
        ({"quantities": [3]}, ConfigTypeError, "quantities: every entry must be a quantity name"),
        ({"histogram_bins": 0}, ConfigError, "histogram_bins: must be >= 1"),
        ({"cold_iterations": 1.5}, ConfigTypeError, "cold_iterations"),
        ({"command_poll_interval": 0}, ConfigError, "command_poll_interval"),
        ({"schedules": [("stable_rank", 5)]}, ConfigTypeError, "schedules"),
        ({"exclude": 3}, ConfigTypeError, "exclude: expected a glob string"),
    ],
)
def test_errors_name_the_field(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ProbeConfig(**options)


def test_an_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ConfigTypeError, match=r"evry: not a probe option; valid: \[.*'every'"):
        ProbeConfig().with_options({"evry": 5})


def test_the_probe_takes_a_config_and_options_on_top(tiny_gpt, tmp_path) -> None:
    config = ProbeConfig(every=5, quantities=("stable_rank",), log_dir=str(tmp_path))
    probe = Probe(tiny_gpt, run="c", config=config, every=3, sink=MemorySink())
    assert probe.config == ProbeConfig(every=3, quantities=("stable_rank",), log_dir=str(tmp_path))
    assert probe.config.jacobian_every == 30
    assert [q.name for q in probe.quantities] == ["stable_rank"]
    probe.close()
    with pytest.raises(ConfigTypeError, match="config: expected a ProbeConfig"):
        Probe(tiny_gpt, run="c", config={"every": 5})  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match="evry: not a probe option"):
        Probe(tiny_gpt, run="c", evry=5)


def test_every_field_reaches_the_probe(tiny_gpt, tmp_path, train) -> None:
    # the fields Probe's keywords once could not set: histogram bins and the iteration counts
    probe = Probe(
        tiny_gpt,
        run="c",
        sink=MemorySink(),
        log_dir=tmp_path,
        every=1,
        quantities=["sa_sign_diversity", "jacobian_alignment"],
        histogram_bins=11,
        cold_iterations=7,
        jacobian_iterations=2,
        jacobian_cold_iterations=4,
    )
    assert probe._weights.cold_iterations == 7 and probe._inputs.cold_iterations == 7
    jacobian = next(q for q in probe.quantities if q.name == "jacobian_alignment")
    assert (jacobian.iterations, jacobian.cold_iterations) == (2, 4)  # type: ignore[attr-defined]
    train(tiny_gpt, probe, 1)
    probe.close()
    (histogram,) = probe.transport.sink.batches[0]["histograms"][:1]  # type: ignore[attr-defined]
    assert len(histogram["edges"]) == 12


def test_registration_config_keeps_its_keys() -> None:
    # the run registration's "config" object (stored by the server); auto_recover and
    # recovery joined it: the server installs the auto-recover rule profile from them
    assert set(ProbeConfig().to_json()) == {
        "auto_recover",
        "recovery",
        "every",
        "jacobian_every",
        "quantities",
        "schedules",
        "targets",
        "exclude",
        "embeddings",
        "head",
        "attention",
        "attention_heads",
        "max_rows",
        "max_sequences",
        "jacobian_sequences",
        "power_iterations",
        "lanczos",
        "cold_iterations",
        "jacobian_iterations",
        "jacobian_cold_iterations",
        "jacobian_tolerance",
        "histogram_bins",
        "exact",
    }


def test_copies_and_pickles_keep_what_was_derived() -> None:
    config = ProbeConfig(every=4, schedules={"stable_rank": 2})
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copied == config
        assert copied.with_options({"every": 3}).jacobian_every == 30


def test_auto_recover_is_one_switch_and_recovery_is_validated() -> None:
    config = ProbeConfig(auto_recover=True)
    assert config.recovery == RecoveryConfig.auto_recover()
    assert config.recovery.skip_step and config.recovery.qk_clip_tau == 100.0  # type: ignore[union-attr]
    assert config.with_options({"auto_recover": False}).recovery is None
    explicit = RecoveryConfig(keep=1)
    assert ProbeConfig(auto_recover=True, recovery=explicit).recovery is explicit
    assert config.to_json()["recovery"]["update_ratio_hot"] == 0.05
    with pytest.raises(ConfigError, match=r"recovery\.keep"):
        RecoveryConfig(keep=0)
    with pytest.raises(ConfigError, match=r"recovery\.lr_factor"):
        RecoveryConfig(lr_factor=1.5)
    with pytest.raises(ConfigTypeError, match="recovery: expected a RecoveryConfig"):
        ProbeConfig(recovery={"keep": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"recovery\.flight_before"):
        RecoveryConfig(flight_steps=8, flight_before=16)
