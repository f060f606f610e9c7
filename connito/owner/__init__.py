"""What the subnet owner runs: the bootstrap (domain data, tokenizer, pretraining, expert
selection) and downstream evaluation of a published global model.

The rule the layer keeps: it may use the library, the protocol and everything below them, never
the neurons (``connito.node``) or the localnet. Import a room by name
(``from connito.owner.bootstrap import run_select``).
"""

__all__ = ["bootstrap", "downstream_eval"]
