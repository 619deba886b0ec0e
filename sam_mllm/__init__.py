"""sam_mllm: train, evaluate and extend SAM (Semantic Alignment for Multimodal LLMs)."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the API is used, so `import sam_mllm` is quick.
    if name in ("load_model", "Pipeline"):
        from sam_mllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'sam_mllm' has no attribute {name!r}")


__all__ = ["load_model", "Pipeline", "__version__"]
