"""The ML core: MoE adapters over transformers, model loading, ESFT selection, the expert-subset
model, the sparse trainer, the DiLoCo outer optimizer, document pools, the update bound.

The rule the layer keeps: it knows no chain, store, protocol, library or neuron. It imports only
``connito.config``, ``connito.errors``, ``connito.fsutil``, ``connito.data`` and itself, takes
tensors and records and returns tensors and records. Import a room by name
(``from connito.ml.moe import moe_layers``): importing one room does not load the others.
"""

__all__ = [
    "delta_sketch",
    "distributed",
    "document_pools",
    "eval_pool",
    "expert_slices",
    "modeling",
    "moe",
    "outer",
    "selection",
    "selection_record",
    "subset",
    "subset_loading",
    "subset_skeleton",
    "trainer_state",
    "training",
    "update_bound",
]
