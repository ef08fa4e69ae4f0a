"""Data: image sources, the synthetic set, SimCLR augmentation and deterministic loaders.

Sub-packages, each importing only those below it (``tests/data/test_layers.py``):

- :mod:`simclr_cli.data.listing`: file listing (image folders, compact lists and the listing cache, list files);
  the bottom, no torch.
- :mod:`simclr_cli.data.sources`: image sources (``images.py``), the dataset registry and its builders, the synthetic
  set, splits, label subsets, transfer datasets.
- :mod:`simclr_cli.data.shards`: packed shards, the ``simclr data pack`` / ``data index`` writer apart from the
  ``ShardSource`` reader (which ``sources/builders.py`` builds for ``data.dataset = "shards"``).
- :mod:`simclr_cli.data.pipeline`: decoding, SimCLR augmentation, the batched backend and the loaders.
- :mod:`simclr_cli.data.check`: ``simclr data check``, on top: it builds a recipe's sources through the loaders.
"""
