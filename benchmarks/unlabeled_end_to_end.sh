#!/usr/bin/env bash
# End to end on unlabeled data (issue 13): pretrain on a FLAT folder of images with no labels,
# measure kNN against a separately given small labeled folder (vs the same protocol on a random
# encoder), then `simclr embed` the folder and `simclr export` the encoder.
#
#   bash benchmarks/unlabeled_end_to_end.sh [WORKDIR]     # default benchmarks/.cache/e2e (git-ignored)
#
# Data: the CIFAR-10 JPEG copy in ../shared/data (32 px). The unlabeled folder is the first
# $UNLABELED (default 10000) training images copied flat (renamed, no class folders); the labeled set
# is a separate folder: 100 train + 100 test images per class from the *test* half, disjoint from it.
# Prints one JSON line with the two kNN top-1 numbers, the embedding shape and the export files.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-benchmarks/.cache/e2e}
UNLABELED=${UNLABELED:-10000}
EPOCHS=${EPOCHS:-5}
SIMCLR=${SIMCLR:-simclr}
ARCHIVE=../shared/data/cifar10-jpeg.tar.gz
mkdir -p "$WORK"
if [ ! -d "$WORK/cifar10" ]; then tar xzf "$ARCHIVE" -C "$WORK"; fi
python3 - "$WORK" "$UNLABELED" <<'PY'
import shutil, sys
from pathlib import Path
work, n = Path(sys.argv[1]), int(sys.argv[2])
flat, labeled = work / "photos", work / "labeled"
if not flat.is_dir():
    flat.mkdir()
    train = sorted((work / "cifar10" / "train").glob("*/*.jpg"))
    step = max(1, len(train) // n)
    for i, f in enumerate(train[::step][:n]):  # every class, no labels kept: names say nothing
        shutil.copy(f, flat / f"img_{i:06d}.jpg")
if not labeled.is_dir():
    for c in sorted((work / "cifar10" / "test").iterdir()):
        files = sorted(c.glob("*.jpg"))
        for split, part in (("train", files[:100]), ("val", files[100:200])):
            (labeled / split / c.name).mkdir(parents=True, exist_ok=True)
            for f in part:
                shutil.copy(f, labeled / split / c.name / f.name)
PY
RUN="$WORK/runs/photos"
rm -rf "$WORK/runs"
$SIMCLR pretrain quickstart --out "$RUN" --set name=photos \
  --set data.dataset=folder --set "data.root=$WORK/photos" --set "data.labeled=$WORK/labeled" \
  --set pretrain.epochs="$EPOCHS" --set pretrain.knn_every=0 --set data.num_workers=2 --quiet
$SIMCLR knn "$RUN" --quiet
$SIMCLR knn "$RUN" --init random --quiet
$SIMCLR embed "$RUN" --data "$WORK/photos" --out "$WORK/photos.npy" --overwrite
$SIMCLR export "$RUN" --out "$WORK/export" --overwrite
python3 - "$RUN" "$WORK" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
run, work = Path(sys.argv[1]), Path(sys.argv[2])
trained = json.loads((run / "knn" / "summary.json").read_text())
random = json.loads((run / "random_init" / "knn" / "summary.json").read_text())
emb = np.load(work / "photos.npy")
print(json.dumps({"knn_top1_pretrained": trained["knn_top1"], "knn_top1_random_init": random["knn_top1"],
                  "embed_shape": list(emb.shape),
                  "export_files": sorted(p.name for p in (work / "export").iterdir())}))
PY
