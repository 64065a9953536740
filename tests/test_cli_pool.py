"""`swarm credits` and `swarm pool ...` run in-process on a temporary data dir: what they
print, what they store, and their one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from swarm.cli import main
from swarm.credits import Receipt
from swarm.identity import Identity
from swarm.ledger import Ledger
from swarm.pool import Invitation, PoolStore
from tests.conftest import REPO
from tests.test_pool_desk import load_stage_engine, pool_stage

NETWORK = "swarm-cli-test"


def swarm(capsys, data_dir: Path, *args: str) -> tuple[int, str, str]:
    """Runs `swarm ARGS --data-dir DATA_DIR` here; (exit code, stdout, stderr)."""
    code = main([*args, "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result: tuple[int, str, str], needle: str) -> None:
    code, _, err = result
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


@pytest.fixture(scope="module")
def stage_engine(tiny_model, data_dir):
    return load_stage_engine(tiny_model, data_dir)


def _with_network(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.yaml").write_text(f"network:\n  gossip_network_id: {NETWORK}\n")
    return data_dir


# --- credits ------------------------------------------------------------------------------


def test_credits_of_a_new_node_are_zero_and_bronze(capsys, tmp_path: Path):
    code, out, _ = swarm(capsys, tmp_path, "credits")
    me = Identity.load_or_create(tmp_path).peer_id
    assert code == 0
    assert f"peer      {me}" in out and "tier      bronze" in out
    assert "balance   0 credits (earned 0, spent 0)" in out
    assert "recent receipts" not in out
    code, out, _ = swarm(capsys, tmp_path, "credits", "--json")
    state = json.loads(out)
    assert (state["peer_id"], state["tier"], state["balance"], state["recent"]) == (me, "bronze", 0, [])


def test_credits_count_what_was_earned_and_spent(capsys, tmp_path: Path):
    me, other = Identity.load_or_create(tmp_path), Identity.generate()
    ledger = Ledger(tmp_path, me.peer_id)
    ledger.add(
        Receipt.create(
            other, request_id="r1", network_id="swarm", stage_key=me.public_key, layers=(0, 4), tokens=10
        )
    )
    ledger.add(
        Receipt.create(
            me, request_id="r2", network_id="swarm", stage_key=other.public_key, layers=(2, 4), tokens=5
        )
    )
    code, out, _ = swarm(capsys, tmp_path, "credits", "--json")
    state = json.loads(out)
    assert (state["earned"], state["spent"], state["balance"]) == (40, 10, 30)
    assert state["receipts"] == {"earned": 1, "spent": 1}
    assert [(r["direction"], r["credits"]) for r in state["recent"]] == [("spent", 10), ("earned", 40)]

    code, out, _ = swarm(capsys, tmp_path, "credits")
    assert code == 0
    assert "balance   30 credits (earned 40, spent 10)" in out
    assert f"tier      {state['tier']}" in out
    assert "receipts  1 earned, 1 spent" in out
    assert f"spent  to   {other.peer_id}  layers 2-4  5 tokens  10 credits" in out
    assert f"earned from {other.peer_id}  layers 0-4  10 tokens  40 credits" in out
    _, out, _ = swarm(capsys, tmp_path, "credits", "--limit", "1")
    assert "spent  to" in out and "earned from" not in out

    _, out, _ = swarm(capsys, tmp_path, "credits", "--leaderboard", "--json")
    rows = json.loads(out)["peers"]
    assert [row["peer_id"] for row in rows if row.get("self")] == [me.peer_id]
    _, out, _ = swarm(capsys, tmp_path, "credits", "--leaderboard")
    assert f"{me.peer_id}" in out and "(this node)" in out


def test_credits_limit_must_be_positive(capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exit_:
        main(["credits", "--limit", "0", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "not a positive integer" in capsys.readouterr().err


# --- pool ---------------------------------------------------------------------------------


def test_pool_create_members_and_leave(capsys, tmp_path: Path):
    me = Identity.load_or_create(tmp_path).peer_id
    code, out, _ = swarm(capsys, tmp_path, "pool", "members")
    assert (code, out) == (0, "this node is in no pool\n")

    code, out, _ = swarm(capsys, tmp_path, "pool", "create", "home lab", "--device-name", "desktop")
    assert code == 0 and "created pool 'home lab'" in out
    code, out, _ = swarm(capsys, tmp_path, "pool", "members")
    assert f"pool 'home lab' ({me}), version 1: this node is its owner" in out
    assert me in out and "desktop" in out and "(owner, this node)" in out
    _, out, _ = swarm(capsys, tmp_path, "pool", "members", "--json")
    view = json.loads(out)
    assert view["role"] == "owner" and [m["peer_id"] for m in view["pool"]["members"]] == [me]
    assert_one_line_error(swarm(capsys, tmp_path, "pool", "create", "again"), "already in pool 'home lab'")
    assert_one_line_error(swarm(capsys, tmp_path, "pool", "remove", me), "`swarm pool leave` dissolves")
    assert_one_line_error(swarm(capsys, tmp_path, "pool", "remove", "a" * 32), "is not a member")

    code, out, _ = swarm(capsys, tmp_path, "pool", "leave")
    assert code == 0 and "left pool 'home lab'" in out
    assert PoolStore(tmp_path).state() is None
    assert_one_line_error(swarm(capsys, tmp_path, "pool", "leave"), "in no pool")


def test_private_mode_is_shown_saved_and_warns_without_a_pool(capsys, tmp_path: Path):
    code, out, _ = swarm(capsys, tmp_path, "pool", "private-mode")
    assert code == 0 and out.startswith("private mode off (with local-network peers, 0 pool devices)")
    assert not (tmp_path / "config.yaml").exists()

    code, out, err = swarm(capsys, tmp_path, "pool", "private-mode", "on", "--no-lan")
    assert code == 0 and "private mode on (without local-network peers" in out
    assert "applied when the node starts" in out  # no node runs here
    assert "in no pool: only this node can serve" in err
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "pool": {"private_mode": True, "private_mode_allow_lan": False}
    }
    swarm(capsys, tmp_path, "pool", "create", "home lab")
    code, out, err = swarm(capsys, tmp_path, "pool", "private-mode")
    assert out.startswith("private mode on (without local-network peers, 1 pool device)") and err == ""

    code, out, _ = swarm(capsys, tmp_path, "pool", "private-mode", "off")
    assert code == 0 and out.startswith("private mode off")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "pool": {"private_mode_allow_lan": False}
    }


def test_private_mode_signals_the_running_nodes_supervisor(capsys, tmp_path: Path, node_server, monkeypatch):
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append((pid, signum)))
    code, out, _ = swarm(capsys, tmp_path, "pool", "private-mode", "on")
    assert code == 0 and "the running node applies it now" in out
    assert sent == [(os.getpid(), signal.SIGHUP)]  # no supervisor: the node (this process) itself

    monkeypatch.setattr(psutil.Process, "environ", lambda self: {"SWARM_INTERNAL_SUPERVISOR_PID": "4242"})
    swarm(capsys, tmp_path, "pool", "private-mode", "off")
    assert sent[-1] == (4242, signal.SIGHUP)


def test_invite_needs_a_running_node_in_a_network(
    capsys, tmp_path: Path, node_server, mock_backend, monkeypatch
):
    stopped = tmp_path / "stopped"
    swarm(capsys, stopped, "pool", "create", "home lab")
    assert_one_line_error(
        swarm(capsys, stopped, "pool", "invite"), "cannot invite: the node is not reachable"
    )

    assert_one_line_error(swarm(capsys, tmp_path, "pool", "invite"), "in no pool")
    swarm(capsys, tmp_path, "pool", "create", "home lab")
    assert_one_line_error(swarm(capsys, tmp_path, "pool", "invite"), "not serving in a network")

    info = mock_backend.info()
    peering = {"network_id": NETWORK, "stage": {"address": "127.0.0.1:45678"}}
    monkeypatch.setattr(mock_backend, "info", lambda: {**info, "peering": peering})
    code, out, err = swarm(capsys, tmp_path, "pool", "invite", "--device-name", "laptop")
    assert code == 0 and "only devices on this machine" in err
    invitation = Invitation.from_code(out.splitlines()[0])
    invitation.verify()
    assert (invitation.owner_address, invitation.network_id, invitation.device_name) == (
        "127.0.0.1:45678",
        NETWORK,
        "laptop",
    )
    assert out.splitlines()[1].startswith("valid until ")
    _, out, _ = swarm(capsys, tmp_path, "pool", "members")
    assert f"open invitation {invitation.invitation_id} for 'laptop'" in out


def test_join_over_the_network_then_the_owner_removes_the_device(capsys, tmp_path: Path, stage_engine):
    owner_dir, device_dir = _with_network(tmp_path / "owner"), _with_network(tmp_path / "laptop")
    owner = Identity.load_or_create(owner_dir)
    laptop = Identity.load_or_create(device_dir).peer_id
    swarm(capsys, owner_dir, "pool", "create", "home lab")
    with pool_stage(stage_engine, PoolStore(owner_dir), owner, NETWORK) as stage:
        invitation = Invitation.create(
            owner, pool_name="home lab", owner_address=stage.address, network_id=NETWORK, ttl_s=600.0
        )
        PoolStore(owner_dir).record_invitation(invitation)
        code, out, _ = swarm(
            capsys, device_dir, "pool", "join", invitation.to_code(), "--device-name", "laptop"
        )
        assert code == 0 and f"joined pool 'home lab' of {owner.peer_id}: 2 devices" in out
        assert_one_line_error(swarm(capsys, device_dir, "pool", "join", invitation.to_code()), "already used")
    _, out, _ = swarm(capsys, device_dir, "pool", "members")
    assert "this node is its member" in out and "laptop" in out
    assert_one_line_error(swarm(capsys, device_dir, "pool", "remove", owner.peer_id), "only the owner")
    assert_one_line_error(
        swarm(capsys, owner_dir, "pool", "join", invitation.to_code()), "remove them or leave"
    )

    code, out, _ = swarm(capsys, owner_dir, "pool", "remove", laptop)
    assert code == 0 and f"removed {laptop}" in out
    assert PoolStore(owner_dir).state().member_ids() == {owner.peer_id}
    PoolStore(device_dir).save(PoolStore(owner_dir).state())  # what the device's next refresh stores
    _, out, _ = swarm(capsys, device_dir, "pool", "members")
    assert "this node was removed from pool 'home lab'" in out and laptop not in out
    code, out, _ = swarm(capsys, device_dir, "pool", "create", "laptop pool")
    assert code == 0 and PoolStore(device_dir).state().pool_id == laptop


def test_pool_and_credits_commands_do_not_import_jax(tmp_path: Path):
    code = (
        "import sys; from swarm.cli import main; "
        f"assert main(['pool', 'members', '--data-dir', {str(tmp_path)!r}]) == 0; "
        f"assert main(['credits', '--data-dir', {str(tmp_path)!r}]) == 0; "
        "sys.exit('jax' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
