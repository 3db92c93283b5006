"""Evaluate a checkpoint (`--help`); the command is glow.cli.evaluate, installed as `glow-eval`."""

from glow.cli.evaluate import main

if __name__ == "__main__":
    main()
