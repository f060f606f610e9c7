"""The neurons: the miner, the validator (and its persisted state), the node context and phase
loop they share, the neuron command line, the entry point and metrics.

The rule the layer keeps: this is where chain, store, protocol, ML core and library are wired
together; nothing below imports it (only ``connito.localnet`` and the entry points do). Import a
room by name (``from connito.node.miner import Miner``).
"""

__all__ = [
    "context",
    "main",
    "metrics",
    "miner",
    "neuron_cli",
    "neuron_flags",
    "validator",
    "validator_state",
]
