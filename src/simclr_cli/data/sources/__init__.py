"""Image sources: what a dataset is (:mod:`~simclr_cli.data.sources.images`: ``ImageSource`` and its kinds, the one
image decoder), how each dataset of the registry is built (:mod:`~simclr_cli.data.sources.builders`,
:mod:`~simclr_cli.data.sources.registry`, :mod:`~simclr_cli.data.sources.synthetic`), split
(:mod:`~simclr_cli.data.sources.splits`, :mod:`~simclr_cli.data.sources.subsets`) and used for transfer
(:mod:`~simclr_cli.data.sources.transfer`). Built on :mod:`simclr_cli.data.listing`."""
