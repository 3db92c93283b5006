"""Evaluation jobs on a checkpoint: the tasks (bits/dim, dumps, samples, FID, latents), the
per-sample dump format, result tables and PNG complexity. Imports nothing heavy at package level."""

TASKS = ("dump", "bpd", "samples", "fid", "latents")  # what an evaluation job can be asked to compute
