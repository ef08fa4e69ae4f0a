"""File listing, the bottom of ``data/``: image folders (:mod:`~simclr_cli.data.listing.folders`), compact lists and
the listing cache (:mod:`~simclr_cli.data.listing.index`) and list files (:mod:`~simclr_cli.data.listing.lists`).
Nothing here imports torch or the rest of ``data/``."""
