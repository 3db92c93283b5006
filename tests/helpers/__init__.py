"""Test helpers: the one home of what several test modules share (tests/README.md says which to use).

* :mod:`.repo` - the repository's paths and scripts, the CPU environment, running a command as a
  subprocess (:func:`run`) or a click entry point in this process (:func:`invoke`), loading a script.
* :mod:`.toy` - tiny 32x32 toy shard sets, the training command line, training in this process.
* :mod:`.gloo` - ranks on a real gloo process group in spawned processes (trainers included).
* :mod:`.fake_sources` - data sets in their real on-disk formats (CelebA, SVHN, CIFAR, IDX, folders).
* :mod:`.fake_runs` - run directories with dumps written by glow's own writer (figures, reports).
* :mod:`.tars` - hostile tar shards and the memory a refusal costs.
* :mod:`.models` - small initialised models and images for the numerics tests.
* :mod:`.slurm_cluster` - the throw-away two-node Slurm cluster (and ``slurm_standin/``).
"""
