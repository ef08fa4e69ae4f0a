"""Run under torchrun (2 processes, gloo): sharded feature extraction against one process running every batch,
then the ``knn`` stage (random init) on RECIPE into RUN_DIR.

    sharded_worker.py OUT RECIPE RUN_DIR

Writes one JSON per rank (``OUT.rank<r>.json``) for tests/evaluation/test_sharded_multiprocess.py.
"""

import json
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from simclr_cli.engine.setup import make_accelerator
from simclr_cli.evaluation.knn import extract_features
from simclr_cli.evaluation.linear import predict
from simclr_cli.evaluation.sharded import ShardedBatches
from simclr_cli.models import create_backbone
from simclr_cli.recipe import load_recipe
from simclr_cli.stages import knn


class Images(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 7, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.y[i])}


def main(out: str, recipe: str, run_dir: str) -> None:
    accelerator = make_accelerator("no")  # the gloo process group of the torchrun launch
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    model = create_backbone("test_resnet", cifar_stem=True)
    for m in model.modules():  # eval-mode BN with non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.train()  # run_model must switch to eval and back
    result = {}
    # 23 and 37 are not multiples of 2 x batch; 5 with batch 4 leaves rank 1 only a padding batch
    for n, bs in ((23, 4), (37, 8), (5, 4), (3, 8)):
        ds = Images(n)
        one = DataLoader(ds, batch_size=bs)  # one process, every batch
        sharded = DataLoader(ds, batch_sampler=ShardedBatches(n, bs, rank, world))
        ref_f, ref_y = extract_features(model, one, torch.device("cpu"))
        f, y = extract_features(model, sharded, torch.device("cpu"))
        ref_p, _ = predict(model, one, torch.device("cpu"))
        main_only = predict(model, sharded, torch.device("cpu"), everywhere=False)
        result[f"{n}/{bs}"] = {
            "features_equal": torch.equal(f, ref_f),
            "labels_equal": torch.equal(y, ref_y) and torch.equal(y, ds.y),
            "shape": list(f.shape),
            "my_batches": len(sharded),
            "main_only": None if main_only is None else torch.equal(main_only[0], ref_p),
            "still_training": model.training,
        }
    result["knn"] = knn.run(load_recipe(recipe, []), None, run_dir, init="random", show_progress=False)
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
