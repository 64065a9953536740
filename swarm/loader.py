"""Opening a model by name or path: GGUF, config, tokenizer, chat template, engine.

Owns `OpenedModel`, the bundle every front end (CLI, node, benchmarks) starts from,
and the caches of derived data under `<data_dir>/cache` (parsed GGUF metadata, built
tokenizers), so a second start does not pay for parsing a large vocabulary again.
Building an engine (which imports jax) is a separate step: `swarm info` needs none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from swarm.chat_template import ChatTemplate
from swarm.files import atomic_write_text
from swarm.gguf_file import GGUFFile
from swarm.model_config import ModelConfig
from swarm.models import resolve_model
from swarm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from swarm.engine import Engine, EngineSettings


@dataclass
class OpenedModel:
    name: str
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate

    def engine(
        self,
        settings: EngineSettings | None = None,
        layer_range: tuple[int, int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        from swarm.engine import Engine

        return Engine.load(self.gguf, self.config, layer_range, settings, progress)


def _load_tokenizer(gguf: GGUFFile, cache_dir: Path | None) -> Tokenizer:
    cache_path = cache_dir / "tokenizers" / f"{gguf.cache_key}.json" if cache_dir else None
    if cache_path and cache_path.exists():
        try:
            return Tokenizer.from_json(cache_path.read_text(encoding="utf-8"))
        except ValueError:
            pass  # damaged cache entry: rebuild it below
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    if cache_path:
        atomic_write_text(cache_path, tokenizer.to_json())
    return tokenizer


def open_model(name_or_path: str, data_dir: Path, *, install_missing: bool = True) -> OpenedModel:
    """A registered name, an hf: reference, a .gguf path, or a shard directory."""
    path = resolve_model(name_or_path, data_dir, install_missing=install_missing)
    cache_dir = data_dir / "cache"
    if path.is_dir():
        from swarm.shards import ShardSet

        gguf: GGUFFile = ShardSet.open(path).as_gguf(cache_dir)
    else:
        gguf = GGUFFile.open(path, cache_dir)
    config = ModelConfig.from_metadata(gguf.metadata, tensor_names=frozenset(gguf.tensors))
    return OpenedModel(
        name=name_or_path,
        path=path,
        gguf=gguf,
        config=config,
        tokenizer=_load_tokenizer(gguf, cache_dir),
        chat_template=ChatTemplate.from_metadata(gguf.metadata),
    )
