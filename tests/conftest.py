"""Shared pytest fixtures."""

import pytest
import torch

from glow.evaluation.fid import FID_WEIGHTS_FILE

# A real two-node Slurm cluster (session scope); see tests/slurm_cluster.py.
from tests.slurm_cluster import slurm_cluster  # noqa: F401


@pytest.fixture(scope="session")
def random_inception_home(tmp_path_factory):
    """A torch hub cache holding an Inception state dict with random weights under the exact
    file name pytorch-fid loads, built by pytorch-fid's own fid_inception_v3 (download disabled)."""
    from pytorch_fid import inception as fid_inception

    home = tmp_path_factory.mktemp("torch_home")
    orig = fid_inception._inception_v3

    def no_load(*args, **kwargs):
        net = orig(*args, **kwargs)
        net.load_state_dict = lambda *a, **k: None  # keep the random weights
        return net

    mp = pytest.MonkeyPatch()
    mp.setattr(fid_inception, "_inception_v3", no_load)
    mp.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: None)
    try:
        torch.manual_seed(0)
        net = fid_inception.fid_inception_v3()
    finally:
        mp.undo()
    path = home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    return home
