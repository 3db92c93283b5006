"""Figures and the OOD table of one run (`--help`); the command is glow.cli.figures, installed as `glow-figures`."""

from glow.cli.figures import main

if __name__ == "__main__":
    main()
