"""Credits API: `/api/admin/credits` (this node's balance) and `/api/credits/leaderboard`.

Reads the node's ledger in `<data_dir>/swarm.db` directly (`swarm.ledger`, jax-free), so
it answers while the node process loads or restarts. The balance is what others signed
receipts for minus the receipts this node signed; the standing weights earnings by
how much each receipt's signer is trusted, and sets the tier (DESIGN.md §9). Must not
import jax.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from control import app as application
from control.errors import ApiError
from swarm.credit_desk import leaderboard, summary
from swarm.identity import Identity
from swarm.ledger import Ledger

bp = Blueprint("credits", __name__, url_prefix="/api")

MAX_ROWS = 500


def ledger_of_node() -> tuple[Ledger, Identity, str]:
    data_dir = current_app.config["DATA_DIR"]
    identity = Identity.load_or_create(data_dir)
    network_id = application.settings().network.gossip_network_id
    return Ledger(data_dir, identity.peer_id), identity, network_id


def _limit(default: int) -> int:
    raw = request.args.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ROWS:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_ROWS}", param="limit")
    return int(raw)


def credits_state(recent: int = 20, board: int = 0) -> dict[str, Any]:
    """This node's credits: balance, earned, spent, standing, tier, recent receipts (and
    the first `board` leaderboard rows)."""
    ledger, identity, network_id = ledger_of_node()
    return summary(ledger, identity, network_id, recent=recent, board=board)


@bp.get("/admin/credits")
def admin_credits() -> Response:
    return jsonify(credits_state(_limit(20)))


@bp.get("/credits/leaderboard")
def credits_leaderboard() -> Response:
    ledger, identity, network_id = ledger_of_node()
    return jsonify({"peers": leaderboard(ledger, identity, network_id, limit=_limit(50))})
