"""Write image sources as WebDataset shards: DIR/<dataset>/<split>/<dataset>-<split>-%06d.tar + manifest.json.

\b
Examples:
  python shards/build.py demo                                   # photo crops + digits OOD, no download
  python shards/build.py gaussian --n-train 20000 --n-test 2000 # busy field + gaussian-smooth OOD
  python shards/build.py celeba --root ~/data/celeba --preset kirichenko32 --workers 8
  python shards/build.py celeba --root ~/data/celeba --preset glow64 --out data/shards64
  python shards/build.py svhn --root ~/data/svhn                # train/test (+extra if present)
  python shards/build.py cifar10 --root ~/data/torchvision       # cifar-10-batches-py/ (cifar100: cifar-100-python/)
  python shards/build.py fashion-mnist --root ~/data/torchvision # FashionMNIST/raw/ IDX files, padded to 32x32, gray
  python shards/build.py mnist --root ~/data/torchvision         # MNIST/raw/
  python shards/build.py folder --root ~/photos --name photos --split-fraction test=0.1 --seed 0
  python shards/build.py verify --out data/shards celeba/test   # check shards against the manifest
  python shards/build.py features --from data/shards --split celeba/train --split celeba/test \
      --split svhn/test --extractor efficientnet_b4 --weights efficientnet_b4_rwightman-23ab8bcd.pth \
      --out data/features_efficientnet                           # image shards -> feature vectors

A rerun of the same command resumes an interrupted build (complete shards are kept after
their sha256 is checked); a build with other settings into the same directory is refused
unless --overwrite is given. `python shards/build.py COMMAND -h` shows a command's options.
No --config or KEY=VALUE: a build's settings are its options, recorded in manifest.json
(which the rerun check compares); a training config does not apply to making shards.
Exit codes: 0 done, 2 usage error, 4 data error (source missing or unreadable, build refused,
verification failed), 1 internal error (with a traceback).
"""
from __future__ import annotations

import logging

import click

from glow.cli import require_extra
from glow.data import shards as S
from glow.errors import exit_on_user_error
from glow.logs import setup_logging
from glow.names import parse_spec

LOG = logging.getLogger("shards.build")


def _common(f):
    f = click.option("--out", "out", default="data/shards", show_default=True, type=click.Path(file_okay=False),
                     help="Shard root; writes OUT/<dataset>/<split>/.")(f)
    f = click.option("--samples-per-shard", default=S.DEFAULT_SAMPLES_PER_SHARD, show_default=True,
                     type=click.IntRange(min=1),
                     help="Samples per tar (500: ~1.7 MB a shard at 32x32 RGB, ~4.1 MB at 64x64; CelebA train is "
                          "326 shards). Keep shards >= training ranks x loader workers (docs/cluster.md).")(f)
    f = click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Worker processes for decoding/resizing (0 = in this process).")(f)
    f = click.option("--overwrite", is_flag=True, help="Replace a previous build made with other settings.")(f)
    f = click.option("--skip-bad", is_flag=True,
                     help="Skip unreadable source images (recorded in the manifest) instead of failing.")(f)
    return f


def _synthetic(f):
    """Options of the generated sources (demo, gaussian): sizes, seed, and the common ones."""
    f = _common(f)
    f = click.option("--seed", default=0, show_default=True, help="Seed of the generated images.")(f)
    f = click.option("--n-test", default=2000, show_default=True, type=click.IntRange(min=1),
                     help="Images in each test split.")(f)
    return click.option("--n-train", default=20000, show_default=True, type=click.IntRange(min=1),
                        help="Images in the training split.")(f)


def _run(sources, out, samples_per_shard, workers, overwrite, skip_bad):
    for src in sources:
        man = S.build(src, out, samples_per_shard=samples_per_shard, workers=workers,
                      overwrite=overwrite, skip_bad=skip_bad)
        msg = f"{src.dataset}/{src.split}: {man['count']} samples in {len(man['shards'])} shards"
        if man["skipped"]:
            msg += f", {len(man['skipped'])} unreadable images skipped"
        click.echo(msg)


def _sources(fn, *args, **kw):
    return fn(*args, **kw)


class _Commands(click.Group):
    """Every command ends on a user error (glow.errors.UserError) with its message and exit code."""

    def invoke(self, ctx):
        return exit_on_user_error(super().invoke)(ctx)


@click.group(cls=_Commands, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def cli(verbose):
    setup_logging(level=logging.DEBUG if verbose else None)


@cli.command()
@click.option("--root", required=True, type=click.Path(),
              help="CelebA as downloaded: Img/img_align_celeba/ and Eval/list_eval_partition.txt (official release), "
                   "celeba/img_align_celeba/ and celeba/list_eval_partition.txt (torchvision), or both side by side.")
@click.option("--preset", type=click.Choice(["kirichenko32", "glow64"]), default="kirichenko32", show_default=True,
              help="kirichenko32: Resize(32)+CenterCrop(32); glow64: CenterCrop(148)+Resize(64).")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Override the preset's output size. [default: the preset's, 32 or 64]")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "valid", "test"]),
              help="Only these splits, repeatable. [default: all three]")
@_common
def celeba(root, preset, resolution, splits, **kw):
    """CelebA aligned faces with the official train/valid/test partition.

    \b
    Example:
      python shards/build.py celeba --root ~/data/celeba --preset kirichenko32 --workers 8
    """
    from glow.data.sources.celeba import celeba_sources

    _run(_sources(celeba_sources, root, preset, resolution, splits or None), **kw)


@cli.command()
@click.option("--root", required=True, type=click.Path(), help="Holds train_32x32.mat, test_32x32.mat (extra_32x32.mat).")
@click.option("--resolution", type=click.IntRange(min=1), default=32, show_default=True,
              help="Output size; != 32 resizes bilinearly.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test", "extra"]),
              help="Only these splits, repeatable. [default: all found]")
@_common
def svhn(root, resolution, splits, **kw):
    """SVHN cropped digits (.mat files); label 10 becomes 0.

    \b
    Example:
      python shards/build.py svhn --root ~/data/svhn --out data/shards
    """
    require_extra("glow-shards svhn", "shards", ("scipy",))
    from glow.data.sources.svhn import svhn_sources

    _run(_sources(svhn_sources, root, resolution, splits or None), **kw)


def _cifar_command(name: str, layout: str, title: str):
    @cli.command(name=name, help=f"{title} python pickle batches ({layout}/), labels in each sample's JSON.\n\n"
                                 "\b\nExample:\n"
                                 f"  python shards/build.py {name} --root ~/data/torchvision --out data/shards")
    @click.option("--root", required=True, type=click.Path(), help=f"Holds {layout}/ (torchvision's root=).")
    @click.option("--resolution", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Output size; != 32 resizes bilinearly.")
    @click.option("--valid", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Hold out the last N train images as a 'valid' split (train keeps the rest).")
    @click.option("--split", "splits", multiple=True, type=click.Choice(["train", "valid", "test"]),
                  help="Only these splits, repeatable. [default: all three]")
    @_common
    def command(root, resolution, valid, splits, **kw):
        from glow.data.sources.cifar import cifar_sources

        _run(_sources(cifar_sources, name, root, resolution, valid, splits or None), **kw)



def _idx_command(name: str, layout: str, title: str):
    @cli.command(name=name, help=f"{title} IDX files ({layout}/, .gz or not): 1 channel, padded to 32x32, labels "
                                 f"in each sample's JSON.\n\n\b\nExample:\n  python shards/build.py {name} --root "
                                 f"~/data/torchvision --out data/shards")
    @click.option("--root", required=True, type=click.Path(), help=f"Holds {layout}/ (torchvision's root=).")
    @click.option("--resolution", type=click.IntRange(min=28), default=32, show_default=True,
                  help="Output size: the 28x28 images are padded (centred, black), never resized.")
    @click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test"]),
                  help="Only these splits, repeatable. [default: both]")
    @_common
    def command(root, resolution, splits, **kw):
        from glow.data.sources.mnist import idx_sources

        _run(_sources(idx_sources, name, root, resolution, splits or None), **kw)



_cifar_command("cifar10", "cifar-10-batches-py", "CIFAR-10")
_cifar_command("cifar100", "cifar-100-python", "CIFAR-100 (fine labels)")
_idx_command("mnist", "MNIST/raw", "MNIST")
_idx_command("fashion-mnist", "FashionMNIST/raw", "Fashion-MNIST")


def _parse_fractions(values) -> dict[str, float]:
    out = {}
    for v in values:
        name, _, frac = v.rpartition("=")
        try:
            out[name or "test"] = float(frac)
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected FRACTION or SPLIT=FRACTION, e.g. test=0.1") from None
    return out


@cli.command()
@click.option("--root", required=True, type=click.Path(), help="Folder searched recursively for images.")
@click.option("--name", default=None, help="Dataset name. [default: the folder's name]")
@click.option("--resolution", type=click.IntRange(min=1), default=32, show_default=True,
              help="Short side resized to this, then centre-cropped square.")
@click.option("--split-fraction", "fractions", multiple=True, default=("test=0.1",), show_default=True,
              help="SPLIT=FRACTION (repeatable; a bare number means test); the rest is train.")
@click.option("--seed", default=0, show_default=True, help="Seed of the deterministic split assignment.")
@_common
def folder(root, name, resolution, fractions, seed, **kw):
    """Any folder of images (recursive), split by a hash of (seed, relative path).

    \b
    Example:
      python shards/build.py folder --root ~/photos --name photos --split-fraction test=0.1 --split-fraction valid=0.05
    """
    from glow.data.sources.folder import folder_sources

    _run(_sources(folder_sources, root, name, resolution, _parse_fractions(fractions), seed), **kw)


@cli.command()
@_synthetic
def demo(n_train, n_test, seed, **kw):
    """Embedded demo: demo/train, demo/test (scikit-image photo crops) and digits/test (OOD).

    \b
    Example:
      python shards/build.py demo --out data/shards
    """
    require_extra("glow-shards demo", "demo", ("skimage", "sklearn"))
    from glow.data.sources.demo import demo_sources, digits_sources

    _run(demo_sources(n_train, n_test, seed) + digits_sources(), **kw)


@cli.command()
@_synthetic
def gaussian(n_train, n_test, seed, **kw):
    """Gaussian random fields of known density: gaussian/{train,test} and gaussian-smooth/test (OOD).

    \b
    Example:
      python shards/build.py gaussian --n-train 20000 --n-test 2000
    """
    require_extra("glow-shards gaussian", "shards", ("scipy",))
    from glow.data.sources.gaussian_field import gaussian_sources

    _run(gaussian_sources("gaussian", n_train, n_test, seed) + gaussian_sources("gaussian-smooth", n_train, n_test, seed),
         **kw)


@cli.command()
@click.option("--from", "source_root", required=True, type=click.Path(file_okay=False, exists=True),
              metavar="DATA_ROOT", help="Image shard root holding DATASET/SPLIT/ (the --out of an image build).")
@click.option("--split", "specs", multiple=True, required=True, metavar="DATASET/SPLIT",
              help="Image split to turn into vectors, repeatable (e.g. --split celeba/train --split svhn/test).")
@click.option("--extractor", required=True, metavar="inception|efficientnet_b4",
              help="inception: FID's Inception-v3 pool3, 2,048-d; efficientnet_b4: torchvision's EfficientNet-B4 "
                   "pooled features, 1,792-d (the paper's).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The extractor's weights file (never downloaded here). [default: the torch hub cache file "
                   "under its published name, $TORCH_HOME/hub/checkpoints/]")
@click.option("--sha256", "expected_sha256", default=None, metavar="HEX",
              help="sha256 (or a prefix of >= 8 hex digits) of a weights file that is not the published one. "
                   "[default: the published file's prefix]")
@click.option("--random-init", "random_seed", type=int, default=None, metavar="SEED",
              help="Demos and tests only: write the extractor randomly initialised (torch seed SEED) to --weights "
                   "FILE and extract with it. Such vectors are not the paper's features; their manifest says "
                   "the weights are not the published ones. [default: off]")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="OUT",
              help="Features root: writes OUT/<dataset>/<split>/ (vector shards and manifest.json).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per extractor call (recorded: another batch size is another build).")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="Loader workers reading the image shards.")
@click.option("--overwrite", is_flag=True, help="Replace vectors built with other settings.")
def features(source_root, specs, extractor, weights, expected_sha256, random_seed, out, batch_size, num_workers,
             overwrite):
    """Image shards -> feature vectors of a frozen extractor, one vector shard per image shard.

    Resumable (a rerun keeps the finished shards); on several processes (`accelerate launch
    -m glow.cli.shards features ...`) each reads its own shards and the vectors are bitwise the
    same as on one. The vectors are the data set of a flow on features (`model.kind: tabular`,
    configs celeba_features_*; docs/variants.md). Exit code 5 for a weights file that is missing,
    has another sha256 or holds anything but tensors.

    \b
    Example (the demo, with a randomly initialised extractor: a smoke test, not the paper's features):
      python shards/build.py features --from data/shards --split demo/train --split demo/test \
          --split digits/test --extractor inception --random-init 0 --weights data/inception-random.pth \
          --out data/features
    """
    from glow.distributed import finish, make_accelerator, on_main
    from glow.features.extract import extract_features
    from glow.features.extractors import (
        EXTRACTORS,
        load_extractor,
        write_random_weights,
    )

    if extractor not in EXTRACTORS:
        raise click.BadParameter(f"{extractor!r} is not one of {sorted(EXTRACTORS)}", param_hint="--extractor")
    if random_seed is not None and (weights is None or expected_sha256 is not None):
        raise click.BadParameter("--random-init writes the random weights to --weights FILE and checks that file "
                                 "itself: give --weights, not --sha256", param_hint="--random-init")
    try:
        splits = [parse_spec(spec) for spec in specs]
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--split") from None
    accelerator = make_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if random_seed is not None:  # rank 0 writes the file; every rank loads it, checked against its sha256
        expected_sha256 = on_main(lambda: write_random_weights(extractor, weights, random_seed), world, rank)
    net = load_extractor(extractor, weights, device=accelerator.device, expected_sha256=expected_sha256)
    for dataset, split in splits:
        man = extract_features(source_root, dataset, split, out, net, rank=rank, world_size=world,
                               batch_size=batch_size, num_workers=num_workers, overwrite=overwrite,
                               progress=rank == 0)
        if rank == 0:
            origin = "the published weights" if man["extractor_weights"]["official"] else "NOT the published weights"
            click.echo(f"{dataset}/{split}: {man['count']} vectors of {man['dim']} ({extractor}, {origin}, sha256 "
                       f"{man['weights_sha256'][:16]}) in {len(man['shards'])} shards")
    finish(accelerator)


@cli.command()
@click.option("--out", default="data/shards", show_default=True, type=click.Path(file_okay=False),
              help="Shard root holding <dataset>/<split>/.")
@click.argument("specs", nargs=-1, required=True, metavar="DATASET/SPLIT...")
def verify(out, specs):
    """Check shards against their manifest, one or more DATASET/SPLIT (e.g. celeba/test).

    \b
    Example:
      python shards/build.py verify --out data/shards celeba/train celeba/test
    """
    for spec in specs:
        try:
            dataset, split = parse_spec(spec)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
        r = S.verify(out, dataset, split)
        click.echo(f"{spec}: OK, {r['count']} samples in {r['shards']} shards")


if __name__ == "__main__":
    cli()
