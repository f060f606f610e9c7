"""The fail-fast family check: the model_type from ``config.json`` as plain JSON, before torch loads.

``connito select`` and ``connito plan`` run this first, importing nothing heavier than the domain
config, so that a family connito refuses stops the command with one line in well under five
seconds. A Hub id without a local copy is left to ``connito.ml.model_config``, which fetches that
one file through transformers.

May import: connito.config, connito.errors, connito.ml.moe_families, connito.ml.model_config
(its path helper; transformers is imported there only when a config is read).
"""

from __future__ import annotations

import json
from pathlib import Path

from connito.config import ModelConfig
from connito.errors import ConfigError, UnsupportedModelError
from connito.ml.model_config import config_copy_path
from connito.ml.moe_families import family_of, refusal_reason

__all__ = ["local_model_type", "check_family_early"]


def _read_model_type(path: Path, *, where: str) -> str:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the model's config.json: {exc}", path=str(path), field=where
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ConfigError("config.json has no model_type", path=str(path), field=where)
    return str(raw["model_type"])


def local_model_type(
    model_cfg: ModelConfig, *, config_path: Path, model_dir: Path | None = None
) -> str | None:
    """The model_type known without the network: inline, ``--model`` folder or the repository copy.

    None when only the Hub (or a library base) can tell.
    """
    if model_dir is not None:
        return _read_model_type(model_dir / "config.json", where="--model")
    if model_cfg.inline is not None:
        return str(model_cfg.inline["model_type"])
    if model_cfg.id is None:
        return None
    copy = config_copy_path(config_path, model_cfg.id)
    if copy.exists():
        return _read_model_type(copy, where="model.id")
    if (Path(model_cfg.id) / "config.json").exists():
        return _read_model_type(Path(model_cfg.id) / "config.json", where="model.id")
    return None


def check_family_early(model_cfg: ModelConfig, *, config_path: Path, model_dir: Path | None = None) -> None:
    """Refuse an unsupported family from local files alone.

    Raises:
        ConfigError: a local config.json is unreadable or has no model_type.
        UnsupportedModelError: one line naming the model_type and why it is refused.
    """
    model_type = local_model_type(model_cfg, config_path=config_path, model_dir=model_dir)
    if model_type is not None and family_of(model_type) is None:
        raise UnsupportedModelError(
            f"model {model_cfg.name}: model_type={model_type}: {refusal_reason(model_type)}"
        )
