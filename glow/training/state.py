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


def fault_injection_pause() -> None:
    """Tests only: sleep between saving the state and writing COMPLETE, so that a test
    can kill the process in the middle of a checkpoint save."""
    seconds = float(os.environ.get("GLOW_TEST_PAUSE_BEFORE_COMPLETE", "0"))
    if seconds > 0:
        log.warning("GLOW_TEST_PAUSE_BEFORE_COMPLETE: pausing %.1f s before COMPLETE", seconds)
        time.sleep(seconds)


def fault_injection_step_delay() -> None:
    """Tests only: sleep after every step, so that a long-lived test run costs no CPU."""
    seconds = float(os.environ.get("GLOW_TEST_STEP_SECONDS", "0"))
    if seconds > 0:
        time.sleep(seconds)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
