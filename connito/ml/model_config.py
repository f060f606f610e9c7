"""The base model's transformers config, read before anything else: type checks and plans need no weights.

``connito select`` and ``connito plan`` read only ``config.json``: from a local folder, from the
repository's copy under ``configs/models/`` (so the shipped real configs work offline), or from
the Hub (one small file). An unknown family, an unreachable id or a malformed config is one line.

May import: connito.config, connito.errors, connito.ml.moe_families.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from connito.config import ModelConfig
from connito.errors import ConfigError, UnsupportedModelError
from connito.ml.moe_families import family_of, refusal_reason

if TYPE_CHECKING:  # transformers is imported where a config is read: the path helper stays light
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = ["MODEL_CONFIG_DIR", "config_copy_path", "read_model_config", "check_model_config"]

MODEL_CONFIG_DIR = "models"  # configs/models/<org>--<name>.json, beside configs/domains/


def config_copy_path(config_path: Path, model_id: str) -> Path:
    """Where the repository keeps a copy of ``model_id``'s ``config.json`` for a domain YAML."""
    return config_path.resolve().parent.parent / MODEL_CONFIG_DIR / (model_id.replace("/", "--") + ".json")


def _from_file_or_hub(source: str, *, revision: str | None, where: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        if revision is None:
            return AutoConfig.from_pretrained(source, trust_remote_code=False)
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot read the model's config.json from {source!r}: {first}", field=where
        ) from None


def read_model_config(
    model_cfg: ModelConfig, *, config_path: Path | None = None, model_dir: Path | None = None
) -> PretrainedConfig | None:
    """The transformers config of the domain's base model, reading nothing but ``config.json``.

    Order: ``model_dir``; the inline config; the repository copy next to ``config_path``; a local
    folder or the Hub at the pinned revision. None for a ``library:`` base (its family is the
    library base's, checked when that is loaded).

    Raises:
        ConfigError: the config cannot be read or is rejected by transformers (one line).
    """
    if model_dir is not None:
        return _from_file_or_hub(str(model_dir), revision=None, where="--model")
    if model_cfg.inline is not None:
        from transformers import AutoConfig, PretrainedConfig

        inline = dict(model_cfg.inline)
        if family_of(str(inline.get("model_type"))) is None:
            return PretrainedConfig(model_type=str(inline.get("model_type")))  # refused by the caller
        try:
            return AutoConfig.for_model(**inline)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(
                f"transformers rejected the inline config: {exc}", field="model.inline"
            ) from None
    if model_cfg.id is None:
        return None
    if config_path is not None:
        copy = config_copy_path(config_path, model_cfg.id)
        if copy.exists():
            return _from_file_or_hub(str(copy), revision=None, where="model.id")
    local = Path(model_cfg.id)
    revision = None if local.exists() else model_cfg.revision
    return _from_file_or_hub(model_cfg.id, revision=revision, where="model.id")


def check_model_config(
    model_cfg: ModelConfig, *, config_path: Path | None = None, model_dir: Path | None = None
) -> PretrainedConfig | None:
    """``read_model_config``, then refuse a family connito has no adapter for.

    Raises:
        ConfigError: the config cannot be read.
        UnsupportedModelError: one line naming the model_type and why it is refused.
    """
    hf_config = read_model_config(model_cfg, config_path=config_path, model_dir=model_dir)
    if hf_config is None:
        return None
    model_type = str(getattr(hf_config, "model_type", ""))
    if family_of(model_type) is None:
        raise UnsupportedModelError(
            f"model {model_cfg.name}: model_type={model_type}: {refusal_reason(model_type)}"
        )
    logger.debug("model config model=%s model_type=%s", model_cfg.name, model_type)
    return hf_config
