"""The whole subnet on one machine: ``connito localnet``."""

from connito.localnet.runner import LocalnetPlan, run_localnet

__all__ = ["LocalnetPlan", "run_localnet"]
