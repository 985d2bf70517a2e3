"""The health gate's decisions (gateway/update/health.py), fed status documents as the gateway serves them."""

from __future__ import annotations

from typing import Any

from storelink.update.health import Gate, baseline_of, problems


def status(version: str = "2.0.0", *, connected: bool = True, depth: int = 0, delivered: int = 0,
           devices: dict[str, str] | None = None, started: str = "t0", state: str = "running",
           health: list[str] | None = None) -> dict[str, Any]:
    return {"version": version, "state": state, "started_at": started, "health_problems": health or [],
            "uplink": {"connected": connected, "last_error": None if connected else "cannot reach broker"},
            "outbox": {"depth": depth, "delivered_total": delivered},
            "devices": [{"device": d, "state": s} for d, s in (devices or {}).items()]}


def test_what_was_ok_before_must_be_ok_again() -> None:
    before = baseline_of(status("1.0.0", devices={"till": "ok", "printer": "offline"}))
    assert before == {"connected": True, "devices_ok": ["till"]}
    assert problems(status(devices={"till": "ok", "printer": "offline"}), "2.0.0", before, 0) == []
    assert problems(status(devices={"till": "degraded"}), "2.0.0", before, 0) == [
        "device till was ok before the update, now degraded"]
    assert problems(status(connected=False, devices={"till": "ok"}), "2.0.0", before, 0) == [
        "broker not connected (cannot reach broker)"]
    assert "running version '1.0.0', not 2.0.0" in problems(status("1.0.0"), "2.0.0", before, 0)
    assert problems(None, "2.0.0", before, 0) == ["the gateway does not answer its status API"]
    assert problems(status(health=["outbox writer is not running"], devices={"till": "ok"}), "2.0.0", before, 0) == [
        "health: outbox writer is not running"]


def test_a_store_offline_before_the_update_is_not_rolled_back_for_being_offline() -> None:
    offline = baseline_of(status("1.0.0", connected=False))
    assert problems(status(connected=False, depth=500), "2.0.0", offline, 0) == []


def test_the_outbox_must_drain() -> None:
    base = baseline_of(status("1.0.0"))
    assert problems(status(depth=40, delivered=10), "2.0.0", base, 10) == [
        "outbox not draining (40 waiting, nothing delivered since the start)"]
    assert problems(status(depth=40, delivered=11), "2.0.0", base, 10) == []


def test_gate_needs_healthy_for_a_while_within_the_deadline() -> None:
    gate = Gate("2.0.0", baseline_of(status("1.0.0")), deadline=100, healthy_for=5, crash_loop_restarts=3,
                restarts_at_switch=7)
    assert gate.observe(status(), 7, now=10) is None  # healthy, not yet for long enough
    assert gate.observe(status(connected=False), 7, now=12) is None  # a blip resets the clock
    assert gate.observe(status(), 7, now=13) is None
    assert gate.observe(status(), 7, now=17.9) is None
    assert gate.observe(status(), 7, now=18) == "healthy"


def test_gate_fails_at_the_deadline_with_the_last_problems() -> None:
    gate = Gate("2.0.0", baseline_of(status("1.0.0")), deadline=100, healthy_for=5, crash_loop_restarts=3,
                restarts_at_switch=0)
    assert gate.observe(status(connected=False), 0, now=50) is None
    verdict = gate.observe(None, 0, now=100)
    assert verdict == "not healthy within the deadline: the gateway does not answer its status API"


def test_crash_loop_fails_at_once_and_a_new_process_restarts_the_count() -> None:
    gate = Gate("2.0.0", baseline_of(status("1.0.0")), deadline=100, healthy_for=5, crash_loop_restarts=3,
                restarts_at_switch=4)
    assert gate.observe(status(depth=5, delivered=3, started="t1"), 6, now=1) is None
    # A restarted process counts its deliveries from zero again; its first snapshot is the new starting point.
    assert gate.observe(status(depth=5, delivered=0, started="t2"), 6, now=2) is None
    assert gate.delivered_at_start == 0
    assert gate.observe(status(started="t3"), 7, now=3) == "crash loop: the gateway was restarted 3 times since " \
                                                           "the switch"
