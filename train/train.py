"""Train a Glow (`--help`); the command is glow.cli.train, installed as `glow-train`."""

from glow.cli.train import main

if __name__ == "__main__":
    main()
