"""The command-line programs. Each module's `main` (or `cli`) is an installed console script
(glow-train, glow-eval, glow-figures, glow-report, glow-shards) and runs with `python -m glow.cli.<name>`
(so `accelerate launch -m glow.cli.train` works); the scripts in train/, eval/ and shards/ call the same code."""
