"""``simclr data pack``: a dataset into indexed WebDataset tar shards (thin wrapper; the work is in
:mod:`simclr_cli.data.shards`)."""

from __future__ import annotations
