"""Fetch a pretrained base model folder from the Hub (pinned revision, weights and tokenizer only)."""

from __future__ import annotations

from pathlib import Path

from connito.errors import StoreError

__all__ = ["snapshot_base_model"]

# README.md carries the base model's license (model cards of published globals inherit it)
_MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "README.md", "LICENSE*"]


def snapshot_base_model(model_id: str, revision: str, *, cache_dir: Path | None = None) -> Path:
    """A local folder with ``model_id`` at ``revision``: safetensors and configs, never pickles.

    Raises:
        StoreError: the model cannot be fetched (offline, missing, gated).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, allow_patterns=_MODEL_PATTERNS
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise StoreError(
            f"cannot fetch base model {model_id}@{revision}: {type(exc).__name__}: {exc}".splitlines()[0],
            reason="unreachable",
            repo=model_id,
            revision=revision,
        ) from None
    return Path(folder)
