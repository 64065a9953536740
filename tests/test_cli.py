"""The `swarm` command line as a user runs it: output format and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf import GGUFWriter

from tests.conftest import REPO


def swarm(*args: str, data_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "readme.gguf"
    path.write_text("not a model")
    assert_one_line_error(swarm("info", str(path), data_dir=tmp_path), "not a GGUF file")


def test_truncated_file(tmp_path, tiny_model):
    data = tiny_model("llama-tiny").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(swarm("generate", str(path), "--prompt", "hi", data_dir=tmp_path), "truncated")


def test_missing_file(tmp_path):
    assert_one_line_error(swarm("info", str(tmp_path / "nope.gguf"), data_dir=tmp_path), "not found")


def test_unknown_model_name(tmp_path):
    assert_one_line_error(swarm("info", "no-such-model", data_dir=tmp_path), "unknown model", "smollm2-135m")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(swarm("info", str(path), data_dir=tmp_path), "unsupported architecture", "mamba")


def test_prompt_longer_than_the_context(tmp_path, tiny_model):
    path = tiny_model("llama-tiny")
    result = swarm("generate", str(path), "--prompt", "word " * 100, "--max-context", "32", data_dir=tmp_path)
    assert_one_line_error(result, "prompt is too long", "32")


def test_bad_sampling_value(tmp_path, tiny_model):
    result = swarm(
        "generate", str(tiny_model("llama-tiny")), "--prompt", "a", "--top-p", "3", data_dir=tmp_path
    )
    assert_one_line_error(result, "top_p")


def test_info_json(tmp_path, tiny_model):
    result = swarm("info", str(tiny_model("qwen2-tiny")), "--json", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "qwen2"
    assert info["chat_template"] in ("from GGUF", "built-in fallback")
    assert info["layers"] >= 1


def test_generate_json_on_a_tiny_model(tmp_path, tiny_model):
    result = swarm(
        "generate",
        str(tiny_model("llama-tiny")),
        "--prompt",
        "hello",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--top-logprobs",
        "2",
        "--json",
        data_dir=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert set(output) == {"model", "prompt_token_ids", "token_ids", "text", "finish_reason", "top_logprobs"}
    assert output["finish_reason"] in ("stop", "length")
    assert len(output["top_logprobs"]) == len(output["token_ids"])
    assert all(len(step) == 2 and {"id", "logprob"} == set(step[0]) for step in output["top_logprobs"])


@pytest.mark.realmodel
def test_capital_of_france(data_dir, smollm2_path):
    result = swarm(
        "generate",
        "smollm2-135m",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
        data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["text"].startswith(" Paris"), output["text"]
    assert len(output["token_ids"]) <= 8


def test_chat_answers_and_exits(tmp_path, tiny_model):
    """`swarm chat` (what `make run` starts) reads messages, streams replies, exits on /exit."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm",
            "chat",
            str(tiny_model("llama-tiny")),
            "--data-dir",
            str(tmp_path),
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
        input="hello\n/reset\nagain\n/exit\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "swarm chat with" in result.stdout
    assert "(conversation cleared)" in result.stdout
    assert result.stdout.count("> ") >= 3  # a prompt for each message and for the /exit


def test_shard_then_generate_from_the_shards(tmp_path, tiny_model):
    """`swarm shard` splits a model; the shard directory generates what the file does."""
    source = tiny_model("gemma3-tiny")
    out = tmp_path / "shards"
    result = swarm("shard", str(source), "--out", str(out), "--shard-size-mb", "0.05", data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").exists() and len(list(out.glob("shard_*.bin"))) > 1
    outputs = []
    for model in (str(source), str(out)):
        run = swarm(
            "generate",
            model,
            "--prompt",
            "abc",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
            data_dir=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        outputs.append(json.loads(run.stdout)["token_ids"])
    assert outputs[0] == outputs[1]


def test_shard_bad_size(tmp_path, tiny_model):
    result = swarm(
        "shard",
        str(tiny_model("llama-tiny")),
        "--out",
        str(tmp_path / "s"),
        "--shard-size-mb",
        "0",
        data_dir=tmp_path,
    )
    assert_one_line_error(result, "shard")


def test_join_with_a_malformed_invite_code(tmp_path):
    assert_one_line_error(swarm("run", "--join", "swarm://not-a-code", data_dir=tmp_path), "invite")
    assert_one_line_error(swarm("run", "--join", "http://example", data_dir=tmp_path), "swarm://")
    assert not (tmp_path / "logs").exists()  # refused before anything started


def test_peers_and_invite_without_a_running_node(tmp_path):
    for command in ("peers", "invite", "status"):
        result = swarm(command, data_dir=tmp_path)
        if command == "status":  # reports each part as down rather than failing
            assert result.returncode == 0 and "node: down" in result.stdout and "dht: down" in result.stdout
        else:
            assert_one_line_error(result, "dht.sock")
