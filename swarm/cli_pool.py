"""The `swarm credits` and `swarm pool ...` commands (the rest of the CLI is `swarm.cli`).

Credits are read from the ledger in the data dir, so `swarm credits` works with the node
stopped; so do the pool commands but `invite` (it needs the running node's stage
address) and `join` (it asks the pool owner's stage over the network). Never imports jax.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from swarm.errors import SwarmError


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Adds `credits` and `pool` to the `swarm` command's subcommands."""
    credits = commands.add_parser(
        "credits", help="this node's credits: balance, tier, recent receipts (works with the node stopped)"
    )
    credits.add_argument("--data-dir", help="data directory of the node")
    credits.add_argument("--json", action="store_true", help="print JSON")
    credits.add_argument(
        "--leaderboard", action="store_true", help="rank the known peers by standing instead"
    )
    credits.add_argument(
        "--limit", type=positive_int, help="receipts (default 10) or leaderboard rows (default 50) to show"
    )

    pool = commands.add_parser(
        "pool", help="a private pool of your devices: create, invite, join, private mode"
    )
    pool_commands = pool.add_subparsers(dest="pool_command", required=True)
    pool_create = pool_commands.add_parser("create", help="create a pool owned by this node")
    pool_create.add_argument("name", help="the pool's name")
    pool_invite = pool_commands.add_parser(
        "invite", help="print a swarmpool:// code a device joins with (the node must be running)"
    )
    pool_join = pool_commands.add_parser("join", help="join the pool of a swarmpool:// code")
    pool_join.add_argument("code")
    for command in (pool_create, pool_invite, pool_join):
        command.add_argument("--device-name", default="", help="a label for this (or the invited) device")
    pool_members = pool_commands.add_parser("members", help="list the pool's devices and open invitations")
    pool_members.add_argument("--json", action="store_true", help="print JSON")
    pool_remove = pool_commands.add_parser("remove", help="remove a device from the pool (owner only)")
    pool_remove.add_argument("peer_id")
    pool_leave = pool_commands.add_parser("leave", help="forget this node's pool")
    private = pool_commands.add_parser(
        "private-mode", help="show, or turn on or off, routing this node's requests only through the pool"
    )
    private.add_argument("mode", nargs="?", choices=("on", "off"), help="no argument: show the setting")
    private.add_argument(
        "--lan",
        action=argparse.BooleanOptionalAction,
        help="in private mode, also route through peers on the local network",
    )
    for command in (pool_create, pool_invite, pool_join, pool_members, pool_remove, pool_leave, private):
        command.add_argument("--data-dir", help="data directory of the node")


def _time_text(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix_time))


def cmd_credits(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.config import load_config
    from swarm.credit_desk import leaderboard, summary
    from swarm.identity import Identity
    from swarm.ledger import Ledger

    identity = Identity.load_or_create(data_dir)
    ledger = Ledger(data_dir, identity.peer_id)
    network_id = load_config(data_dir, os.environ).network.gossip_network_id
    if args.leaderboard:
        rows = leaderboard(ledger, identity, network_id, limit=args.limit or 50)
        if args.json:
            print(json.dumps({"peers": rows}, indent=2))
            return 0
        print(f"{'rank':>4}  {'peer':<34} {'tier':<9} {'standing':>12} {'balance':>10}")
        for rank, row in enumerate(rows, 1):
            mark = "  (this node)" if row.get("self") else ("" if row.get("verified") else "  (unverified)")
            print(
                f"{rank:>4}  {row['peer_id']:<34} {row['tier']:<9} {row['standing']:>12.3f}"
                f" {row['balance']:>10}{mark}"
            )
        return 0
    state = summary(ledger, identity, network_id, recent=args.limit or 10)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    receipts = state["receipts"]
    print(f"peer      {state['peer_id']}")
    print(f"tier      {state['tier']}")
    print(f"balance   {state['balance']} credits (earned {state['earned']}, spent {state['spent']})")
    print(f"standing  {state['standing']}")
    print(
        f"receipts  {receipts['earned']} earned, {receipts['spent']} spent;"
        f" {state['known_peers']} peers' standings known"
    )
    if state["recent"]:
        print("recent receipts:")
    for receipt in state["recent"]:
        earned = receipt["direction"] == "earned"
        peer = receipt["requester"] if earned else receipt["stage"]
        first, last = receipt["layers"]
        print(
            f"  {receipt['direction']:<6} {'from' if earned else 'to':<4} {peer}  layers {first}-{last}"
            f"  {receipt['tokens']} tokens  {receipt['credits']} credits"
        )
    return 0


def _pool_context(data_dir: Path):
    from swarm.identity import Identity
    from swarm.pool import PoolStore

    return PoolStore(data_dir), Identity.load_or_create(data_dir)


def _owned_pool(store, identity, action: str):
    """This node's pool, which it must own to `action`; PoolError otherwise."""
    from swarm.pool import PoolError
    from swarm.pool_view import role_of

    state = store.state()
    role = role_of(state, identity)
    if state is None or role is None:
        raise PoolError("this node is in no pool: create one with `swarm pool create NAME`")
    if role != "owner":
        raise PoolError(f"only the owner of pool {state.name!r} ({state.pool_id}) can {action}")
    return state


def _signal_supervisor(data_dir: Path, signum: int) -> bool:
    """Signals the supervisor of the node serving `data_dir` (or the node itself, when it runs
    without one); False when no node runs. The control plane's workers get the supervisor's pid
    in their environment (control.admin.signal_supervisor); this process is not its child, so it
    reads the same variable from the node process's environment."""
    import psutil

    from control.node_client import NodeClient, NodeError, NodeUnavailable
    from swarm.node_protocol import SOCKET_NAME

    try:
        node_pid = int(NodeClient(data_dir / SOCKET_NAME, request_timeout_s=10).health()["pid"])
        supervisor = psutil.Process(node_pid).environ().get("SWARM_INTERNAL_SUPERVISOR_PID")
        os.kill(int(supervisor or node_pid), signum)
    except (NodeUnavailable, NodeError, psutil.Error, OSError, KeyError, TypeError, ValueError):
        return False
    return True


def cmd_pool_create(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.pool import PoolError, PoolState
    from swarm.pool_view import role_of

    store, identity = _pool_context(data_dir)
    current = store.state()
    if current is not None and role_of(current, identity):
        raise PoolError(f"this node is already in pool {current.name!r}: leave it first (swarm pool leave)")
    state = PoolState.create(identity, args.name, args.device_name)
    if current is not None:  # a pool this node was removed from
        store.leave()
    store.save(state)
    print(f"created pool {state.name!r} ({state.pool_id}); add devices with `swarm pool invite`")
    return 0


def cmd_pool_invite(args: argparse.Namespace, data_dir: Path) -> int:
    from control.node_client import NodeClient, NodeError, NodeUnavailable
    from swarm.config import load_config
    from swarm.node_protocol import SOCKET_NAME
    from swarm.pool import Invitation
    from swarm.pool_view import invitation_address

    store, identity = _pool_context(data_dir)
    state = _owned_pool(store, identity, "invite devices")
    try:
        info = NodeClient(data_dir / SOCKET_NAME, request_timeout_s=10).info()
    except (NodeUnavailable, NodeError) as error:
        raise SwarmError(
            f"cannot invite: {error} (an invitation names the running node's peer stage: `swarm run` starts it)"
        ) from None
    address, warning = invitation_address(info)
    config = load_config(data_dir, os.environ)
    invitation = Invitation.create(
        identity,
        pool_name=state.name,
        owner_address=address,
        network_id=info["peering"].get("network_id") or config.network.gossip_network_id,
        ttl_s=config.pool.invitation_ttl_hours * 3600.0,
        device_name=args.device_name,
    )
    store.record_invitation(invitation)
    print(invitation.to_code())
    print(f"valid until {_time_text(invitation.expires)}, once: on the device run `swarm pool join CODE`")
    if warning:
        print(f"swarm: warning: {warning}", file=sys.stderr)
    return 0


def cmd_pool_join(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.config import load_config
    from swarm.pool import PoolError
    from swarm.pool_desk import request_join
    from swarm.pool_view import join_refusal

    store, identity = _pool_context(data_dir)
    refusal = join_refusal(store.state(), identity)
    if refusal:
        raise PoolError(refusal)
    network_id = load_config(data_dir, os.environ).network.gossip_network_id
    state = request_join(identity, network_id, args.code, args.device_name, store=store)
    print(f"joined pool {state.name!r} of {state.pool_id}: {len(state.members)} devices")
    return 0


def cmd_pool_members(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.pool_view import describe_pool

    store, identity = _pool_context(data_dir)
    view = describe_pool(store, identity)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    pool = view["pool"]
    if pool is None:
        print("this node is in no pool")
        return 0
    if view["removed"]:
        print(f"this node was removed from pool {pool['name']!r}; `swarm pool leave` forgets it")
    else:
        print(
            f"pool {pool['name']!r} ({pool['pool_id']}), version {pool['version']}: this node is its {view['role']}"
        )
    for member in pool["members"]:
        notes = [note for note, on in (("owner", member["owner"]), ("this node", member["self"])) if on]
        print(
            f"  {member['peer_id']}  {member['device_name'] or '-':<20} joined {_time_text(member['joined_at'])}"
            + (f"  ({', '.join(notes)})" if notes else "")
        )
    for invitation in view["invitations"]:
        label = f" for {invitation['device_name']!r}" if invitation["device_name"] else ""
        print(
            f"  open invitation {invitation['invitation_id']}{label}, until {_time_text(invitation['expires'])}"
        )
    return 0


def cmd_pool_remove(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.pool import PoolError

    store, identity = _pool_context(data_dir)
    state = _owned_pool(store, identity, "remove devices")
    if args.peer_id == identity.peer_id:
        raise PoolError("the owner cannot remove itself: `swarm pool leave` dissolves the pool")
    store.save(state.without_member(identity, args.peer_id))
    print(f"removed {args.peer_id} from pool {state.name!r}")
    return 0


def cmd_pool_leave(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.pool import PoolError

    store, _ = _pool_context(data_dir)
    state = store.state()
    if state is None:
        raise PoolError("this node is in no pool")
    store.leave()
    print(f"left pool {state.name!r}")
    return 0


def cmd_pool_private_mode(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.config import apply_updates, load_config, save_config
    from swarm.pool_view import private_mode_view

    store, identity = _pool_context(data_dir)
    updates: dict[str, bool] = {}
    if args.mode is not None:
        updates["private_mode"] = args.mode == "on"
    if args.lan is not None:
        updates["private_mode_allow_lan"] = args.lan
    applied = ""
    if updates:
        # Only config.yaml's own values are saved: SWARM_* variables stay out of the file.
        save_config(data_dir, apply_updates(load_config(data_dir, {}), {"pool": updates}))
        signalled = _signal_supervisor(data_dir, signal.SIGHUP)
        applied = "; saved, " + (
            "the running node applies it now" if signalled else "applied when the node starts"
        )
    view = private_mode_view(load_config(data_dir, os.environ).pool, store, identity)
    lan = "with" if view["allow_lan"] else "without"
    print(
        f"private mode {'on' if view['private_mode'] else 'off'} ({lan} local-network peers,"
        f" {view['members']} pool device{'' if view['members'] == 1 else 's'}){applied}"
    )
    if "warning" in view:
        print(f"swarm: warning: {view['warning']}", file=sys.stderr)
    return 0


POOL_COMMANDS = {
    "create": cmd_pool_create,
    "invite": cmd_pool_invite,
    "join": cmd_pool_join,
    "members": cmd_pool_members,
    "remove": cmd_pool_remove,
    "leave": cmd_pool_leave,
    "private-mode": cmd_pool_private_mode,
}


def cmd_pool(args: argparse.Namespace, data_dir: Path) -> int:
    return POOL_COMMANDS[args.pool_command](args, data_dir)


COMMANDS = {"credits": cmd_credits, "pool": cmd_pool}
