"""Shared pytest fixtures."""

import pytest
import torch

from glow.evaluation.fid import FID_WEIGHTS_FILE

# A real two-node Slurm cluster (session scope); see tests/helpers/slurm_cluster.py.


@pytest.fixture(scope="session")
def random_inception_home(tmp_path_factory):
    """A torch hub cache holding an FID Inception state dict with random weights under the exact
    file name the weights are published as (built by glow's own network: no download, no
    pytorch-fid needed)."""
    from glow.evaluation.inception import fid_inception_v3

    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(0)
    path = home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    path.parent.mkdir(parents=True)
    torch.save(fid_inception_v3().state_dict(), path)
    return home
