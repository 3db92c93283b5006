"""glow.tracking: training, evaluation and figures results reach the tracker the run names,
read back from the tracker's own files (wandb's offline transaction log, TensorBoard event
files, MLflow's file store); progress suits where the output goes."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from glow.progress import Progress
from glow.tracking import run_tracker

STEP = 100


def wandb_records(run_file: Path):
    """Every record of an offline run's ``run-<id>.wandb``, parsed with wandb's own protobuf
    schema. The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then
    32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(run_file: Path) -> dict:
    """{'run': the run record, 'summary': {key: value}, 'history': {key: value}, 'exited': bool}."""
    out: dict = {"summary": {}, "history": {}, "exited": False}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "exit":
            out["exited"] = True
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                out["history"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return out


def offline_runs(run_dir: Path, expected: int, timeout: float = 60.0) -> dict[str, dict]:
    """job_type -> the read-back run, for every offline run folder under <run>/wandb/.

    wandb's writer is a separate process that may still be flushing when ``finish()``
    returns: poll (bounded) until every run's log holds its run and exit records."""
    deadline = time.monotonic() + timeout
    while True:
        folders = sorted((run_dir / "wandb").glob("offline-run-*"))
        backs = [read_offline_run(f) for folder in folders for f in folder.glob("run-*.wandb")]
        if len(backs) == expected and all("run" in b and b["exited"] for b in backs):
            return {b["run"].job_type: b for b in backs}
        if time.monotonic() > deadline:
            raise AssertionError(f"offline runs under {run_dir / 'wandb'} incomplete after {timeout} s: "
                                 f"{[(('run' in b), b['exited']) for b in backs]}")
        time.sleep(0.2)


def eval_and_figures_jobs(tmp_path: Path, run_section: str) -> tuple[Path, dict]:
    """A run whose config.yaml has ``run_section``: an evaluation job reports a dump and the
    samples to its tracker, then the figures command runs; returns the run and ood.json."""
    from glow.evaluation.job import track_results
    from glow.evaluation.result_tables import add_entries
    from glow.evaluation.tasks import EvalContext, EvalOptions
    from glow.run import Run
    from tests.helpers.fake_runs import make_run
    from tests.helpers.repo import load_script

    run = make_run(tmp_path)
    (run / "config.yaml").write_text(f"run:\n  name: r\n{run_section}")
    step_dir = run / "eval" / f"step-{STEP:08d}"
    add_entries(step_dir / "bpd.json", {"celeba/test": {"mean": 3.25, "std": 0.2, "count": 60}})
    tracker = run_tracker(run, "eval", STEP, "dump celeba/test")
    ctx = EvalContext(checkpoint=Run(run).checkpoint(STEP), meta={"step": STEP},
                      options=EvalOptions(tasks=["dump", "samples"], specs=[("celeba", "test")]))
    logged = track_results(tracker, ctx)
    tracker.close()
    assert logged == ["bpd/celeba/test", "bpd_per_sample/celeba/test", "samples"]
    result = CliRunner().invoke(load_script("eval/figures.py").main, ["--run", str(run), "--in", "celeba/test", "--ood", "svhn/test"])
    assert result.exit_code == 0, result.output
    return run, json.loads((run / "figures" / "ood.json").read_text())


def test_evaluation_and_figures_results_read_back_from_the_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run, table = eval_and_figures_jobs(tmp_path, "  logger: wandb\n  wandb_project: glow-test\n")

    runs = offline_runs(run, expected=2)
    assert set(runs) == {"eval", "figures"}
    for job_type, back in runs.items():
        assert back["run"].project == "glow-test" and back["run"].run_group == "r"
        assert back["run"].display_name == f"r-{job_type}-step{STEP}"
    ev = runs["eval"]
    assert ev["summary"]["bpd/celeba/test"] == 3.25
    assert ev["history"]["_step"] == STEP
    assert ev["history"]["bpd_per_sample/celeba/test/_type"] == "histogram"
    assert ev["history"]["samples/_type"] == "image-file"
    fig = runs["figures"]
    assert fig["history"]["ood_table/_type"] == "table-file"
    assert fig["history"]["ood_table/nrows"] == len(table["ood"]["svhn/test"])
    assert fig["summary"]["auroc/svhn/test/log_likelihood"] == pytest.approx(
        table["ood"]["svhn/test"]["log_likelihood"]["auroc"])
    assert fig["history"]["figures/distributions/_type"] == "image-file"
    # The table itself, as wandb stored it beside the run.
    table_file = next((run / "wandb").glob("offline-run-*/files/media/table/ood_table_*.table.json"))
    stored = json.loads(table_file.read_text())
    assert stored["columns"][:3] == ["ood_set", "score", "auroc"]
    assert len(stored["data"]) == fig["history"]["ood_table/nrows"]
    # No key anywhere in the run's files.
    assert not any("api_key" in p.read_text(errors="ignore").lower()
                   for p in (run / "wandb").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".txt"))


def test_no_tracker_without_a_training_config_or_with_logger_none(tmp_path):
    assert run_tracker(tmp_path, "eval", 1).run is None  # not a run made by train.py
    (tmp_path / "config.yaml").write_text("run:\n  name: r\n  logger: none\n")
    assert run_tracker(tmp_path, "eval", 1).run is None
    assert not (tmp_path / "wandb").exists()


def test_a_runs_tracker_missing_here_is_skipped_with_a_warning_an_asked_one_refused(tmp_path, monkeypatch, caplog):
    """An evaluation's results are on disk before the tracker opens: the run's tracker missing
    on this machine costs the mirror, not the job; --logger naming a missing one is an error."""
    import importlib.util

    from glow.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    (tmp_path / "config.yaml").write_text("run:\n  name: r\n  logger: wandb\n")
    with caplog.at_level(logging.WARNING, logger="glow.tracking"):
        assert run_tracker(tmp_path, "eval", 1).run is None
    assert "glow-ood[wandb]" in caplog.text and not (tmp_path / "wandb").exists()
    with pytest.raises(ConfigError, match=r"glow-ood\[wandb\]"):
        run_tracker(tmp_path, "eval", 1, logger="wandb")


def test_wandb_mode_comes_from_the_config_unless_the_environment_says(tmp_path, monkeypatch):
    """run.wandb_mode is the one default (offline); WANDB_MODE, when set, wins; nothing here
    writes to the environment."""
    import wandb

    seen, set_up = [], []
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw.get("mode")) or object())
    monkeypatch.setattr(wandb, "setup",
                        lambda settings: set_up.append(settings.model_dump(exclude_unset=True).get("mode")))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = dict(os.environ)
    for mode in ("offline", "online"):
        (tmp_path / "config.yaml").write_text(f"run:\n  name: r\n  logger: wandb\n  wandb_mode: {mode}\n")
        run_tracker(tmp_path, "eval", 1)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_tracker(tmp_path, "eval", 1)
    assert seen == ["offline", "online", None]  # None: wandb reads WANDB_MODE itself
    assert set_up == ["offline", "online", None]  # set before wandb's service starts
    monkeypatch.delenv("WANDB_MODE")
    assert dict(os.environ) == before


def _tensorboard_events(folder: Path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="TensorBoard is not installed: pip install 'glow-ood[tensorboard]'")
    events = accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                                        "tensors": 0})
    events.Reload()
    return events


def test_training_metrics_read_back_from_tensorboard_and_a_resume_replaces_the_replayed_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install 'glow-ood[tensorboard]'")
    from glow.tracking import Tracker

    config = {"run": {"name": "r", "logger": "tensorboard"}, "train": {"lr": 0.001, "temps": [0.5, 1.0]}}
    image = tmp_path / "samples.png"
    Image.new("RGB", (12, 8), (10, 200, 30)).save(image)
    first = Tracker("tensorboard", tmp_path, "p", "r", config)
    for step in (2, 4, 6):
        first.log({"loss": float(step), "bpd": 3.0}, step)
    first.log_image("samples", image, 6)
    first.close()
    # a requeued job resumed from the checkpoint at step 2 replays steps 4 and 6
    again = Tracker("tensorboard", tmp_path, "p", "r", config)
    for step in (4, 6, 8):
        again.log({"loss": 10.0 + step, "bpd": 3.0}, step)
    again.close()
    events = _tensorboard_events(tmp_path / "tensorboard" / "train")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 2.0), (4, 14.0), (6, 16.0), (8, 18.0)]
    assert not events.Images("samples")  # logged at step 6 by the first attempt: purged with the replay
    from omegaconf import OmegaConf

    hparams = [OmegaConf.load(p) for p in (tmp_path / "tensorboard" / "train").glob("*/hparams.yml")]
    assert len(hparams) == 2 and hparams[0]["train.lr"] == 0.001 and hparams[0]["train.temps"] == "[0.5, 1.0]"


def test_evaluation_and_figures_results_read_back_from_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install 'glow-ood[tensorboard]'")
    run, table = eval_and_figures_jobs(tmp_path, "  logger: tensorboard\n")

    jobs = {p.name.split("-")[0]: p for p in (run / "tensorboard").iterdir()}
    assert set(jobs) == {"eval", "figures"}
    ev = _tensorboard_events(jobs["eval"])
    assert [(e.step, e.value) for e in ev.Scalars("bpd/celeba/test")] == [(STEP, 3.25)]
    assert ev.Histograms("bpd_per_sample/celeba/test")[0].step == STEP
    assert ev.Images("samples")[0].width == 20  # the 20x10 samples.png of make_run
    fig = _tensorboard_events(jobs["figures"])
    auroc = table["ood"]["svhn/test"]["log_likelihood"]["auroc"]
    assert fig.Scalars("auroc/svhn/test/log_likelihood")[0].value == pytest.approx(auroc, rel=1e-6)
    text = fig.Tensors("ood_table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| ood_set | score | auroc") and text.count("\n") == len(table["ood"]["svhn/test"]) + 1
    assert {e.step for e in fig.Images("figures/distributions")} == {STEP}


def test_training_and_evaluation_read_back_from_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install 'glow-ood[mlflow]'")
    from mlflow.tracking import MlflowClient

    from glow.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"run": {"name": "r", "logger": "mlflow"}, "train": {"max_steps": 4}}
    for attempt, steps in enumerate(((2, 4), (4, 6))):  # the second attempt resumes the same MLflow run
        tracker = Tracker("mlflow", tmp_path, "proj", "r", {**config, "train": {"max_steps": 4 + 2 * attempt}})
        for step in steps:
            tracker.log({"loss": float(10 * attempt + step)}, step)
        tracker.close()
    (tmp_path / "config.yaml").write_text("run:\n  name: r\n  logger: mlflow\n  wandb_project: proj\n")
    evaluation = run_tracker(tmp_path, "eval", STEP, "dump celeba/test")
    evaluation.log_summary({"bpd/celeba/test": 3.25})
    evaluation.close()

    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    train_id = (tmp_path / "mlflow_ids" / "train").read_text()
    history = sorted((m.step, m.value) for m in client.get_metric_history(train_id, "loss"))
    assert history == [(2, 2.0), (4, 4.0), (4, 14.0), (6, 16.0)]  # MLflow keeps both attempts' step 4
    train = client.get_run(train_id)
    assert train.data.params["train.max_steps"] == "4"  # logged once, at the first attempt
    assert train.data.tags["glow.job_type"] == "train" and train.data.tags["glow.group"] == "r"
    (eval_file,) = (tmp_path / "mlflow_ids").glob("eval-*")
    ev = client.get_run(eval_file.read_text())
    assert ev.data.metrics["bpd/celeba/test"] == 3.25 and ev.data.tags["glow.job_type"] == "eval"
    assert client.get_experiment(ev.info.experiment_id).name == "proj" == \
        client.get_experiment(train.info.experiment_id).name


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_is_a_bar_on_a_terminal_and_periodic_lines_in_a_log(caplog):
    log_stream = _Stream(tty=False)
    with caplog.at_level(logging.INFO, logger="progress"):
        bar = Progress(100, 10, desc="train", images_per_unit=64, every_s=0.0, stream=log_stream)
        for _ in range(5):
            bar.update(1, **{"bits/dim": "3.412"})
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "progress"]
    assert len(lines) == 6 and log_stream.getvalue() == ""  # one line per update (every_s=0) and the last
    assert lines[-1].startswith("train: step 15/100 (15%), ") and "img/s" in lines[-1] and "3.412 bits/dim" in lines[-1]
    assert "ETA " in lines[-1] and "\r" not in "".join(lines)

    caplog.clear()
    term = _Stream(tty=True)
    with caplog.at_level(logging.INFO, logger="progress"):
        bar = Progress(100, desc="train", every_s=0.0, stream=term)
        bar.update(3)
        bar.close()
    assert not [r for r in caplog.records if r.name == "progress"] and "3/100" in term.getvalue()


def test_progress_lines_are_spaced_by_every_s(caplog):
    with caplog.at_level(logging.INFO, logger="progress"):
        bar = Progress(1000, desc="eval", unit="image", every_s=3600.0, stream=_Stream(tty=False))
        for _ in range(50):
            bar.update(10)
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "progress"]
    assert lines == [lines[-1]] and lines[0].startswith("eval: image 500/1000 (50%)")
    assert np.isfinite(float(lines[0].split(", ")[1].split()[0]))  # a rate, e.g. "123.45 image/s"
