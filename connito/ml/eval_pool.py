"""Score submissions on several devices at once: one resident model replica per device.

A validator's evaluation is one forward pass per held-out batch per submission, and submissions
are independent, so K devices score K submissions at a time. Each replica is a whole model on its
own device; submission i goes to replica ``i % K`` and each replica works through its share in
its own thread (CUDA kernels release the GIL). A submission's experts are swapped into its
replica, evaluated and swapped out exactly as on a single device, so every score is the same
function of the same weights and batches: identical to single-device scoring on devices of one
kind. Results come back in submission order.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["EvalPool"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class EvalPool:
    """Model replicas, one per device, that ``map`` spreads work over round-robin."""

    def __init__(self, replicas: Sequence[nn.Module]) -> None:
        if not replicas:
            raise ValueError("an evaluation pool needs at least one replica")
        self.replicas = list(replicas)

    @classmethod
    def replicate(
        cls,
        model: nn.Module,
        devices: Sequence[str | torch.device],
        *,
        load: Callable[[torch.device], nn.Module] | None = None,
    ) -> EvalPool:
        """``model`` itself on its own device, and a replica on every other device listed.

        A replica needs the same weights as ``model`` outside the selected experts (every
        submission overwrites all of those before it is evaluated). ``load(device)`` builds one,
        e.g. from the base model's folder, so no device ever holds two copies at once; without it
        ``model`` is deep-copied and moved.
        """
        home = next(model.parameters()).device
        replicas: list[nn.Module] = []
        for name in devices:
            device = torch.device(name)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            if device == home and model not in replicas:
                replicas.append(model)
            else:
                replica = load(device) if load is not None else copy.deepcopy(model).to(device)
                replicas.append(replica.eval())
        logger.info(
            "evaluation pool ready replicas=%d devices=%s", len(replicas), ",".join(map(str, devices))
        )
        return cls(replicas)

    @property
    def devices(self) -> list[torch.device]:
        return [next(replica.parameters()).device for replica in self.replicas]

    def map(
        self, fn: Callable[[nn.Module, Item], Result], items: Sequence[Item], *, progress: bool = False
    ) -> list[Result]:
        """``[fn(replica of i, items[i]) for i]``: item i on replica ``i % K``, one thread per replica.

        A replica's items run one after another in its thread, so ``fn`` may mutate its replica
        (swap experts in and out) without locks. The first exception is raised after all threads
        stop.
        """
        count = min(len(self.replicas), len(items))
        results: list[Result | None] = [None] * len(items)
        errors: list[BaseException] = []
        bar = tqdm(total=len(items), desc="evaluate", unit="submission", disable=not progress)
        lock = threading.Lock()

        def work(slot: int) -> None:
            replica = self.replicas[slot]
            try:
                for index in range(slot, len(items), count):
                    results[index] = fn(replica, items[index])
                    with lock:
                        bar.update(1)
            except BaseException as exc:  # handed to the caller once every replica has stopped
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=(slot,), name=f"eval-replica-{slot}") for slot in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bar.close()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]
