"""``connito select --from-scores`` and ``connito select --check``: selection without probing here.

An owner who probed routing elsewhere (another framework, a larger probe set) brings the per-layer
scores and connito applies the configured ESFT rule to them; anyone holding a selection JSON can
re-derive its experts from the scores it records, differential selections included.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from connito.config import load_domain_config
from connito.errors import ConfigError
from connito.ml.model_config import check_model_config
from connito.ml.selection import rederive_selection, selection_from_scores
from connito.ml.selection_record import load_score_file, load_selection, save_selection

logger = logging.getLogger(__name__)

__all__ = ["run_select_from_scores", "run_check_selection"]


def run_select_from_scores(
    config_path: Path, scores_path: Path, out: Path, *, revision: str | None = None
) -> int:
    """Apply the config's selection rule to a score file and write the sealed selection JSON.

    Raises:
        ConfigError: the score file is malformed, its method is not the config's, or a
            differential file lacks the domain shares.
        UnsupportedModelError: the config's model family is refused.
    """
    config = load_domain_config(config_path)
    hf_config = check_model_config(config.model, config_path=config_path)
    scores = load_score_file(scores_path)
    if scores.method != config.selection.method:
        raise ConfigError(
            f"scores are {scores.method}, selection.method is {config.selection.method}",
            path=str(scores_path),
            field="method",
        )
    ranking, mass = {}, {}
    for entry in scores.layers:
        ranking[entry.layer] = torch.tensor(entry.scores, dtype=torch.float64)
        if entry.mass is None and scores.method == "differential":
            raise ConfigError(
                "differential scores need mass (domain token ratios)",
                path=str(scores_path),
                field=f"layers.{entry.layer}.mass",
            )
        mass[entry.layer] = (
            ranking[entry.layer] if entry.mass is None else torch.tensor(entry.mass, dtype=torch.float64)
        )
    selection = selection_from_scores(
        ranking,
        mass,
        config=config.selection,
        domain=config.name,
        model_id=config.model.name,
        model_revision=revision or config.model.revision,
        model_type=None if hf_config is None else str(hf_config.model_type),
        probe_tokens=dict(scores.probe_tokens),
    )
    save_selection(selection, out)
    print(
        f"wrote {out} ({selection.num_selected} experts from {scores_path}, digest {selection.digest[:12]})"
    )
    return 0


def run_check_selection(selection_path: Path) -> int:
    """Re-derive a selection from its recorded scores: 0 and one line if it holds, 1 and one line if not."""
    selection = load_selection(selection_path)
    problems = rederive_selection(selection)
    if problems:
        print(
            f"{selection_path}: does not follow its rule: {problems[0]} ({len(problems)} layers differ)",
            file=sys.stderr,
        )
        return 1
    print(
        f"{selection_path}: ok method={selection.method} p={selection.p} layers={len(selection.layers)} "
        f"experts={selection.num_selected} digest={selection.digest[:12]}"
    )
    return 0
