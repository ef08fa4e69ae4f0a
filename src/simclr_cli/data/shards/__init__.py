"""Packed shards (``simclr data pack``, ``data.dataset = "shards"``): the writer
(:mod:`~simclr_cli.data.shards.writer`: ``simclr data pack`` and ``simclr data index``) apart from the reader
(:class:`~simclr_cli.data.shards.reader.ShardSource`); the layout both follow is in
:mod:`~simclr_cli.data.shards.format`."""
