"""What every node must agree on: cycle phases, commitments and the evaluation seed, checkpoints
and payloads (the strict loader), submissions, the global state, Proof-of-Loss scoring, ranking
and weights, the merge and its record.

The rule the layer keeps: it never imports the neurons (``connito.node``), the owner's tools, the
library or the localnet. It may use the ML core, the data, and the ``Chain`` and
``CheckpointStore`` protocols it is handed. Import a room by name
(``from connito.protocol.phases import phase``).
"""

__all__ = [
    "checkpoint",
    "commitments",
    "global_state",
    "heldout",
    "merge",
    "payload",
    "phases",
    "safetensors_header",
    "scoring",
    "strict_loader",
    "submissions",
]
