"""Run a frozen extractor over an image split and write its vectors as a data set.

``extract_features`` reads the source split with the evaluation stream
(`glow.data.streams.make_eval_loader`: every sample exactly once over all processes, each shard
read whole by one reader) and writes vector shard i from image shard i
(`glow.features.vector_shards`). A shard's vectors are computed once its last image has
arrived, in chunks of ``batch_size`` taken in index order within that shard, so the vectors do
not depend on the number of processes, loader workers or batches of the stream: 1 and N
processes write bitwise-equal shards (on the same kind of device and thread settings). The
batch size is part of the build's settings, since a kernel may round differently at another
batch shape.

Resumable, like an image build: each shard is written atomically by the process that read it,
with a small record beside it (``<shard>.done.json``: its manifest entry and the build's
fingerprint); a rerun keeps every shard whose record (or manifest entry) has the same
fingerprint and whose bytes still match its sha256, and computes only the rest. The decisions
(settings, refusal, what is done) are taken on rank 0 and broadcast; rank 0 holds the split
directory's BUILD.lock for the whole job and writes the manifest (``complete: false`` until
every shard is there, then the records are removed). A directory holding vectors of other
settings (another extractor, weights file, source build or batch size) is refused unless
``overwrite``.

The source is read in full even when resuming (decoding 32x32 PNGs is cheap next to the
extractor; a shard-subset option on the evaluation stream would avoid it).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from glow.data.shards import (
    KEY_FORMAT,
    LOCK,
    MANIFEST,
    BuildBusy,
    BuildRefused,
    split_dir,
    tool_version,
)
from glow.data.streams import make_eval_loader, manifest_hash, read_manifest
from glow.digest import json_digest
from glow.distributed import gather_objects, on_main
from glow.errors import DataError, UserError
from glow.features.extractors import FeatureExtractor
from glow.features.vector_shards import (
    FORMAT_VERSION,
    KIND,
    VectorShardError,
    read_vector_manifest,
    record_format,
    vector_shard_name,
    write_vector_shard,
)
from glow.files import LockHeld, atomic_write_json, hold_lock, read_bytes, read_json
from glow.progress import Progress

__all__ = ["DONE_SUFFIX", "extract_features"]

log = logging.getLogger(__name__)
DONE_SUFFIX = ".done.json"
MAX_DONE_BYTES = 1 << 16


def extract_features(source_root: str | os.PathLike, dataset: str, split: str, out_root: str | os.PathLike,
                     extractor: FeatureExtractor, *, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                     num_workers: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Vectors of every image of ``source_root/dataset/split`` under ``out_root/dataset/split``;
    returns the complete vector manifest on every rank. With ``world_size > 1`` a process group
    must be initialised (every rank calls this)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = split_dir(out_root, dataset, split)
    with contextlib.ExitStack() as stack:  # rank 0 holds the directory's lock until the manifest is complete
        plan = on_main(lambda: _plan(stack, source_root, dataset, split, out_dir, extractor, batch_size, overwrite),
                       world_size, rank)
        mine = _extract_my_shards(plan, source_root, dataset, split, out_dir, extractor, rank, world_size,
                                  batch_size, num_workers, progress)
        gathered = gather_objects(mine, world_size)
        return on_main(lambda: _finish(plan, [e for part in gathered for e in part], out_dir), world_size, rank)


# --------------------------------------------------------------------------- rank 0: settings and resume
def _settings(dataset: str, split: str, source: dict, extractor: FeatureExtractor, batch_size: int) -> dict:
    """What the vectors depend on (their fingerprint): everything else is description."""
    spec = extractor.spec
    return {"format": FORMAT_VERSION, "kind": KIND, "dataset": dataset, "split": split, "dim": spec.dim,
            "record_format": record_format(spec.dim), "extractor": spec.name, "preprocessing": spec.preprocessing,
            "weights_sha256": extractor.weights_sha256, "source_manifest_hash": manifest_hash(source),
            "batch_size": int(batch_size)}


def _plan(stack: contextlib.ExitStack, source_root, dataset: str, split: str, out_dir: Path,
          extractor: FeatureExtractor, batch_size: int, overwrite: bool) -> dict:
    source = read_manifest(source_root, dataset, split)
    settings = _settings(dataset, split, source, extractor, batch_size)
    fingerprint = json_digest(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack.enter_context(hold_lock(out_dir / LOCK, {"build": f"features {dataset}/{split}"}))
    except LockHeld as err:
        raise BuildBusy(f"{out_dir} is being written by another build ({err}); wait for it to finish or stop it") from None
    old = _old_manifest(out_dir, dataset, split)
    if old is not None and old.get("fingerprint") != fingerprint:
        if not overwrite:
            raise BuildRefused(f"{out_dir} already holds vectors of other settings (fingerprint "
                               f"{old.get('fingerprint')} != {fingerprint}: another extractor, weights file, source "
                               "build or batch size); use another output root or pass overwrite to replace them")
        log.info("overwriting the vectors in %s", out_dir)
        _clear(out_dir, dataset, split)
        old = None
    for leftover in out_dir.glob(f".{dataset}-{split}-*.tmp"):
        leftover.unlink()  # interrupted atomic writes (we hold the lock: no live build owns them)
    spec = extractor.spec
    manifest = {**settings, "fingerprint": fingerprint, "tool_version": tool_version(),
                "extractor_weights": {"sha256": extractor.weights_sha256, "expected": extractor.expected_sha256,
                                      "published_prefix": spec.published_sha256, "official": extractor.official},
                "source": {"root": str(Path(source_root).resolve()), "dataset": dataset, "split": split,
                           "count": int(source["count"]), "resolution": source.get("resolution"),
                           "channels": source.get("channels", 3)},
                "shards": [], "count": 0, "complete": False}
    shards = [{"shard": int(e["shard"]), "name": vector_shard_name(dataset, split, int(e["shard"])),
               "count": int(e["count"]), "first_index": int(e["first_index"]), "last_index": int(e["last_index"])}
              for e in source["shards"]]
    done = {}
    old_entries = {e["name"]: e for e in (old or {}).get("shards", [])}
    for s in shards:
        for entry in (old_entries.get(s["name"]), _done_record(out_dir, s["name"], fingerprint)):
            if entry is not None and _intact(out_dir, entry, s):
                done[s["name"]] = entry
                break
    if done:
        log.info("%s/%s: %d of %d vector shards already complete", dataset, split, len(done), len(shards))
    manifest["shards"] = [done[s["name"]] for s in shards if s["name"] in done]
    atomic_write_json(out_dir / MANIFEST, manifest, indent=1)
    return {"manifest": manifest, "shards": shards, "done": sorted(done)}


def _old_manifest(out_dir: Path, dataset: str, split: str) -> dict | None:
    if not (out_dir / MANIFEST).exists():
        return None
    try:
        return read_vector_manifest(out_dir.parent.parent, dataset, split, require_complete=False)
    except (VectorShardError, OSError) as err:
        log.warning("%s is unreadable (%s): treated as a build of other settings", out_dir / MANIFEST, err)
        return {"fingerprint": "<unreadable manifest>"}


def _clear(out_dir: Path, dataset: str, split: str) -> None:
    for pattern in (f"{dataset}-{split}-*.npy", f"{dataset}-{split}-*.npy{DONE_SUFFIX}"):
        for path in out_dir.glob(pattern):
            path.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)


def _done_record(out_dir: Path, name: str, fingerprint: str) -> dict | None:
    path = out_dir / (name + DONE_SUFFIX)
    if not path.exists():
        return None
    try:
        record = read_json(path, MAX_DONE_BYTES)
    except (ValueError, OSError) as err:
        log.warning("%s is unreadable (%s): recomputing that shard", path, err)
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    return record.get("entry")


def _intact(out_dir: Path, entry: dict, shard: dict) -> bool:
    """A previous shard is kept when it is the one expected here and its bytes match its sha256."""
    if not isinstance(entry, dict) or any(entry.get(k) != shard[k] for k in ("name", "count")):
        return False
    try:
        data = read_bytes(out_dir / shard["name"], int(entry.get("bytes", 0)))
    except (OSError, UserError, ValueError):
        return False
    if len(data) == entry.get("bytes") and hashlib.sha256(data).hexdigest() == entry.get("sha256"):
        return True
    log.warning("%s does not match its record; recomputing it", out_dir / shard["name"])
    return False


# --------------------------------------------------------------------------- every rank: extraction
def _extract_my_shards(plan: dict, source_root, dataset: str, split: str, out_dir: Path,
                       extractor: FeatureExtractor, rank: int, world_size: int, batch_size: int, num_workers: int,
                       progress: bool) -> list[dict]:
    """Vectors of the shards this rank reads that are not done yet; returns their entries."""
    source_hash = manifest_hash(read_manifest(source_root, dataset, split))
    if source_hash != plan["manifest"]["source_manifest_hash"]:
        raise DataError(f"{split_dir(source_root, dataset, split) / MANIFEST} changed during the extraction "
                        f"(hash {source_hash}, rank 0 read {plan['manifest']['source_manifest_hash']}); rerun it")
    shards, done = plan["shards"], set(plan["done"])
    firsts = [s["first_index"] for s in shards]
    pending = {i: s for i, s in enumerate(shards) if s["name"] not in done}
    buffers: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    entries: list[dict] = []
    todo = sum(s["count"] for s in pending.values())
    bar = Progress(todo, desc=f"features {dataset}/{split}", enabled=progress and rank == 0, unit="image")
    loader = make_eval_loader(source_root, dataset, split, batch_size=batch_size, rank=rank, world_size=world_size,
                              num_workers=num_workers)
    for batch in loader:
        for j, key in enumerate(batch["key"]):
            index = int(batch["index"][j])
            if key != KEY_FORMAT % index:
                raise DataError(f"sample key {key!r} of {dataset}/{split} is not the key of its index {index}")
            i = bisect.bisect_right(firsts, index) - 1
            if i < 0 or index > shards[i]["last_index"]:
                raise DataError(f"sample {key} of {dataset}/{split} lies in no shard of its manifest")
            if i not in pending:
                continue
            buffer = buffers.setdefault(i, [])
            buffer.append((index, int(batch["label"][j]), batch["image"][j]))
            if len(buffer) == pending[i]["count"]:
                entries.append(_write_shard(out_dir, pending[i], buffers.pop(i), extractor, batch_size,
                                            plan["manifest"]["fingerprint"]))
                bar.update(pending[i]["count"] * world_size)
    bar.close()
    if buffers:
        partial = ", ".join(f"{shards[i]['name']} ({len(b)} of {shards[i]['count']})" for i, b in buffers.items())
        raise DataError(f"{dataset}/{split}: the stream ended inside shards {partial}; the source shards do not "
                        "match their manifest")
    return entries


def _write_shard(out_dir: Path, shard: dict, samples: list, extractor: FeatureExtractor, batch_size: int,
                 fingerprint: str) -> dict:
    samples.sort(key=lambda s: s[0])  # chunks follow the shard's index order, whatever the stream did
    index = np.array([s[0] for s in samples], dtype=np.int64)
    label = np.array([s[1] for s in samples], dtype=np.int64)
    images = torch.stack([s[2] for s in samples])
    vectors = torch.cat([extractor(images[k : k + batch_size]) for k in range(0, len(samples), batch_size)])
    entry = {"shard": shard["shard"], **write_vector_shard(out_dir, shard["name"], index, label, vectors.numpy())}
    atomic_write_json(out_dir / (shard["name"] + DONE_SUFFIX), {"fingerprint": fingerprint, "entry": entry})
    return entry


# --------------------------------------------------------------------------- rank 0: the manifest
def _finish(plan: dict, new_entries: list[dict], out_dir: Path) -> dict:
    manifest, shards = plan["manifest"], plan["shards"]
    by_name = {e["name"]: e for e in manifest["shards"]}
    by_name.update({e["name"]: e for e in new_entries})
    missing = [s["name"] for s in shards if s["name"] not in by_name]
    if missing:
        raise DataError(f"{out_dir}: no vectors for shards {missing[:5]} (of {len(missing)}) after the extraction; "
                        "rerun it")
    manifest["shards"] = [by_name[s["name"]] for s in shards]
    manifest["count"] = sum(e["count"] for e in manifest["shards"])
    if manifest["count"] != manifest["source"]["count"]:
        raise DataError(f"{out_dir}: {manifest['count']} vectors, the source has {manifest['source']['count']} images")
    manifest["complete"] = True
    atomic_write_json(out_dir / MANIFEST, manifest, indent=1)
    for s in shards:
        (out_dir / (s["name"] + DONE_SUFFIX)).unlink(missing_ok=True)
    log.info("%s: %d vectors of dimension %d in %d shards", out_dir, manifest["count"], manifest["dim"],
             len(shards))
    return manifest
