"""The input pipeline, from an image source to training batches: decoding (:mod:`~simclr_cli.data.pipeline.decode`),
SimCLR augmentation (:mod:`~simclr_cli.data.pipeline.augment`, :mod:`~simclr_cli.data.pipeline.batched`) and the
deterministic loaders (:mod:`~simclr_cli.data.pipeline.loaders`)."""
