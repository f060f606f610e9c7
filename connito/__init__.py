"""connito: decentralized sparse Mixture-of-Experts adaptation on a Bittensor subnet."""

__version__ = "0.1.0"
