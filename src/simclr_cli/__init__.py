"""simclr-cli: SimCLR (Chen et al., 2020) as an end-to-end command-line toolkit."""

__version__ = "0.1.0"
