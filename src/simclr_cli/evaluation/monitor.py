"""The kNN monitor of pretraining: kNN top-1 of h on a labeled query split during training (SIMCLR.md section 3).

The labeled train split is the memory bank. Every process extracts its share of both splits (one pass over
them, split K ways); the main process scores on the gathered features (:mod:`simclr_cli.evaluation.knn`).
"""

from __future__ import annotations

from torch import nn

from simclr_cli.evaluation.knn import extract_features, knn_top1


class KnnMonitor:
    """kNN top-1 of an encoder's features on ``query_loader``, with ``bank_loader`` as memory bank.

    Args:
        accelerator: the stage's Accelerator (device, autocast, process count).
        bank_loader, query_loader: this process's share of the labeled bank and query images
            (:func:`simclr_cli.stages.common.eval_loader`).
        num_classes: classes of the labels.
        k, temperature: neighbours, and the weights exp(sim / temperature).
    """

    def __init__(self, accelerator, bank_loader, query_loader, num_classes: int, k: int, temperature: float) -> None:
        self.accelerator = accelerator
        self.bank_loader = bank_loader
        self.query_loader = query_loader
        self.num_classes = num_classes
        self.k, self.t = k, temperature

    def __call__(self, encoder: nn.Module) -> float | None:
        """kNN top-1 on the main process (None on the others). Every process extracts its share of both splits;
        the main one gathers them and scores on its device, in chunks."""
        device, autocast = self.accelerator.device, self.accelerator.autocast
        bank = extract_features(encoder, self.bank_loader, device, autocast, everywhere=False)
        query = extract_features(encoder, self.query_loader, device, autocast, everywhere=False)
        acc = None
        if self.accelerator.is_main_process:
            acc = round(knn_top1(*bank, *query, self.num_classes, self.k, self.t, device=device), 4)
        self.accelerator.wait_for_everyone()
        return acc
