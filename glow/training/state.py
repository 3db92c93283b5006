"""What a training attempt counts and saves besides the weights, and its test-only hooks."""

from __future__ import annotations

import logging
import os
import resource
import time

import torch

__all__ = ["TrainState", "fault_injection_pause", "fault_injection_step_delay", "peak_memory_mb"]

log = logging.getLogger(__name__)


class TrainState:
    """Counters saved with every checkpoint (as JSON: see `glow.checkpoint.save_trainer_state`)."""

    def __init__(self):
        self.step = 0
        self.images_seen = 0
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self.window: list[float] = []  # losses since the last metrics line (so resumed lines match)

    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def fault_injection_pause(step: int) -> None:
    """Tests only: with GLOW_TEST_HOLD_BEFORE_COMPLETE=<dir>, hold between saving the state of
    ``step`` and writing COMPLETE: write ``<dir>/holding-<step>``, then wait until
    ``<dir>/release-<step>`` exists, so that a test can kill the process in the middle of a save
    (a file gate, no clock)."""
    gate = os.environ.get("GLOW_TEST_HOLD_BEFORE_COMPLETE")
    if not gate:
        return
    log.warning("GLOW_TEST_HOLD_BEFORE_COMPLETE: holding step %d before COMPLETE until %s/release-%d exists",
                step, gate, step)
    with open(os.path.join(gate, f"holding-{step}"), "w"):
        pass
    while not os.path.exists(os.path.join(gate, f"release-{step}")):
        time.sleep(0.05)


def fault_injection_step_delay() -> None:
    """Tests only: sleep after every step, so that a long-lived test run costs no CPU."""
    seconds = float(os.environ.get("GLOW_TEST_STEP_SECONDS", "0"))
    if seconds > 0:
        time.sleep(seconds)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
