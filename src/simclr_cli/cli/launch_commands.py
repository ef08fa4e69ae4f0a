"""``simclr launch``: run a stage under ``accelerate launch`` (thin wrapper; the command is built by
:mod:`simclr_cli.launch`)."""

from __future__ import annotations
