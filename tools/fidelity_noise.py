"""How far apart 8-bit activation rounding puts two correct engines: step-0 top-5 logprobs.

    .venv/bin/python tools/fidelity_noise.py [--model smollm2-135m] [--cases 8]

llama.cpp's CPU backend rounds activations to 8 bits inside every quantized product, and
so does our default CPU engine (kernels/cpu). Rounding a value to 8 bits turns a
difference in its last float bit into a whole rounding step whenever the value sits near
a rounding boundary, and that step is large enough to move values across boundaries in
the next layer: the difference grows from layer to layer until two engines are as far
apart as their rounding noise, whatever they agree on otherwise. This script measures
that on the fixture prompts of tests/fixtures/llamacpp, at the first generated token:

* `vs_llama_cpp`: our default engine against llama.cpp's recorded top-5 logprobs;
* `last_bit`: our default engine against itself with one change, RMS norm summing each
  row with `jnp.mean` in f32 instead of in f64 as llama.cpp does, which moves its
  results in the last bit only (`|a - b| <= 1 ulp`);
* `f32_vs_quantized`: our f32 engine (exact products, no activation rounding) against our
  default engine: the size of the rounding noise itself.

If `last_bit` is as large as `vs_llama_cpp`, no engine short of a bit-for-bit copy of
ggml's CPU arithmetic gets closer to llama.cpp than that on these models. Exactness of
the model math itself is tested against llama.cpp on F32 copies (tests/test_real_f32.py).
Prints one JSON object: max and mean |difference| over the top-5 entries of all cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import swarm.model
from swarm.engine import EngineSettings
from swarm.loader import open_model
from swarm.paths import data_dir as default_data_dir
from swarm.sampling import log_softmax

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "llamacpp"


def _mean_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """swarm.model.rms_norm with XLA's own f32 row sum: equal to it up to the last bit."""
    variance = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * weight


def _step0_logprobs(opened, settings: EngineSettings, prompts: list[list[int]]) -> list[np.ndarray]:
    engine = opened.engine(settings)
    out = []
    for prompt in prompts:
        cache = engine.new_cache(engine.cache_capacity(len(prompt) + 1))
        logits, _ = engine.forward(np.asarray(prompt, np.int32), 0, cache)
        out.append(log_softmax(np.asarray(logits)))
    return out


def _summary(a: list[np.ndarray], b: list[np.ndarray], tops: list[list[int]]) -> dict[str, float]:
    differences = [abs(float(x[t]) - float(y[t])) for x, y, top in zip(a, b, tops, strict=True) for t in top]
    return {"max": round(max(differences), 4), "mean": round(float(np.mean(differences)), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m (a fixture exists)"
    )
    parser.add_argument("--cases", type=int, default=8, help="fixture prompts to use")
    args = parser.parse_args(argv)
    fixture_path = FIXTURES / f"{args.model}.json"
    if not fixture_path.is_file():
        parser.error(f"no llama.cpp fixture for {args.model!r} in {FIXTURES}")
    cases = json.loads(fixture_path.read_text(encoding="utf-8"))["cases"][: args.cases]
    prompts = [case["prompt_token_ids"] for case in cases]
    tops = [[token for token, _ in case["steps"][0]["top"]] for case in cases]
    llama = [dict(case["steps"][0]["top"]) for case in cases]

    data_dir = Path(os.environ.get("SWARM_NODE_DATA_DIR") or default_data_dir())
    opened = open_model(args.model, data_dir)
    default = _step0_logprobs(opened, EngineSettings(), prompts)
    exact = _step0_logprobs(opened, EngineSettings(weights="f32"), prompts)
    original = swarm.model.rms_norm
    swarm.model.rms_norm = _mean_rms_norm  # traced anew: a fresh engine compiles its own step
    try:
        last_bit = _step0_logprobs(opened, EngineSettings(), prompts)
    finally:
        swarm.model.rms_norm = original

    differences = [
        abs(float(ours[t]) - ref[t]) for ours, ref in zip(default, llama, strict=True) for t in ref
    ]
    print(
        json.dumps(
            {
                "model": args.model,
                "cases": len(cases),
                "vs_llama_cpp": {
                    "max": round(max(differences), 4),
                    "mean": round(float(np.mean(differences)), 4),
                },
                "last_bit": _summary(default, last_bit, tops),
                "f32_vs_quantized": _summary(default, exact, tops),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
