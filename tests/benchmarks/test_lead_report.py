"""The lead-time report's scoring: the 2x verdict per run, the best peer with and without the
peers that fail the false-alert target, and the counts per architecture."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks.lead_report import OURS, OWN_LOSS, PEERS, markdown_tables, summarise  # noqa: E402

DETECTORS = [*OURS, *PEERS, *OWN_LOSS]


def run(role: str, fail: int | None, **fired: int) -> dict[str, Any]:
    first = {d: None for d in DETECTORS}
    first.update({k.replace("__", ":"): v for k, v in fired.items()})
    return {
        "scenario": "s",
        "seed": len(fired),
        "family": "f",
        "arch": "gpt",
        "role": role,
        "failure": {"kind": None if fail is None else "explosion", "step": fail},
        "trainscope_recorded": False,
        "first_firing": first,
        "lead_time": {
            d: (None if v is None or fail is None else fail - v) for d, v in first.items()
        },
    }


def test_two_x_against_every_peer_and_against_the_quiet_ones() -> None:
    runs = [
        # ours leads by 100, the noisy W&B z by 80, OLMo by 10
        run(
            "failing",
            200,
            rankguard_pack=100,
            peer__wandb_loss_zscore=120,
            peer__olmo_loss_spike=190,
        ),
        # ours leads by 30, nobody else before the failure
        run("failing", 100, rankguard_pack=70, peer__olmo_loss_spike=100),
        # ours late
        run("failing", 100, rankguard_pack=105),
        # W&B z fires on both healthy runs; rankguard's own divergence rule is no peer
        run("healthy", None, peer__wandb_loss_zscore=50),
        run("healthy", None, peer__wandb_loss_zscore=60, peer__loss_gradual_divergence=30),
    ]
    summary = summarise(runs)["gpt"]
    assert summary["detectors"]["peer:wandb_loss_zscore"]["false_alerts"] == 2
    assert "peer:wandb_loss_zscore" not in summary["peers_meeting_false_alert_target"]
    assert "peer:loss_gradual_divergence" not in PEERS
    every = summary["headline"]["rankguard_pack"]["vs_every_peer"]
    quiet = summary["headline"]["rankguard_pack"]["vs_quiet_peers"]
    assert [r["at_least_2x"] for r in every["runs"]] == [False, True, False]
    assert [r["at_least_2x"] for r in quiet["runs"]] == [True, True, False]
    assert every["runs"][0]["best_peer_detector"] == "peer:wandb_loss_zscore"
    assert quiet["runs"][0]["best_peer"] == 10
    text = markdown_tables({"runs": runs, "summary": summarise(runs)})
    assert "+100 (@100)" in text and "2/2" in text
