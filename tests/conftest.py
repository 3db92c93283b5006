"""Shared fixtures (tests/README.md says which to use for what).

Session-scoped, built once and shared read-only: ``toy_shards`` (tests/helpers/toy.py), ``tiny_run``
(a tiny Glow trained 10 steps on them in this process), ``random_inception_home`` (an FID Inception
weights file with random weights) and ``slurm_cluster`` (tests/helpers/slurm_cluster.py). A test that
writes into the run takes ``tiny_run_copy``; one that changes the shards copies them first.
"""

import shutil
from pathlib import Path

import pytest
import torch

from glow.evaluation.fid import FID_WEIGHTS_FILE

# A real two-node Slurm cluster (session scope); see tests/helpers/slurm_cluster.py.
from tests.helpers.slurm_cluster import slurm_cluster  # noqa: F401
from tests.helpers.toy import build_toy_shards, train_in_process

TINY_RUN_STEPS = 10


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The Slurm tests first: their jobs mostly wait (requeues, timeouts), so under pytest-xdist the
    worker that holds the cluster starts them at once and the other workers fill the machine meanwhile,
    instead of the cluster's waits trailing at the end of the run.

    And `--dist loadgroup` really groups: pytest-xdist 3.8 marks a grouped test by appending
    `@<group>` to `item._nodeid`, which pytest 9 no longer reads (it keeps `item._id`), so every
    worker would run Slurm tests and start a cluster of its own (two clusters on one host hand out
    the same job ids, hence the same rendezvous ports). Done here when xdist's suffix is missing."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1)  # stable: order kept within
    if not config.getoption("loadgroup", default=False):
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # a pytest before 9: xdist's own suffix works there
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = coerce_node_id(item.nodeid + suffix)


_BLAS_LIMITS = []  # keeps threadpoolctl's limits for the session


def pytest_configure(config):
    """One intra-op thread, as every subprocess and spawned rank gets (tests/helpers: OMP_NUM_THREADS=1):
    results computed here and in a rank agree bitwise, and parallel test workers do not oversubscribe.
    numpy's and scipy's BLAS too: their spinning threads beside a busy neighbour made a 1-s shard build
    take 25 s."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without the eval extra's scikit-learn
        return
    _BLAS_LIMITS.append(threadpool_limits(limits=1))


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """`toy/train` (240 blocky images), `toy/test` (50, labels 0..2, 3 shards), `toyood/test` (30)."""
    return build_toy_shards(tmp_path_factory.mktemp("toy-shards"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, toy_shards) -> Path:
    """A tiny Glow (train/configs/tiny.yaml) trained TINY_RUN_STEPS steps on ``toy_shards`` in this
    process: its run directory. Read it; write into ``tiny_run_copy``."""
    root = tmp_path_factory.mktemp("tiny-run")
    assert train_in_process(root, toy_shards, f"train.max_steps={TINY_RUN_STEPS}") == 0
    return root / "tiny"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of ``tiny_run`` (links kept as links) for a test that writes results into it."""
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "tiny", symlinks=True))


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
