#!/usr/bin/env bash
# Run a stage on every GPU of this machine (one process per GPU):
#
#   docs/scripts/single_node.sh STAGE ARGS...
#   docs/scripts/single_node.sh pretrain imagenet --set data.root=/data/imagenet --out runs/imagenet
#
# GPUS=4 uses 4 of them. Settings of `accelerate config` apply when it has written a config file. Ctrl-C or SIGTERM
# stops every process at its next step; they save their state first (exit 130): run pretrain again with
# --auto-resume (or --resume) to continue.
#
# Environment: GPUS (default: all the GPUs torch sees), SIMCLR (the command, default `simclr`),
# SIMCLR_LAUNCH_DRY_RUN=1 (print the accelerate command instead of running it).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STAGE ARGS..." >&2
    exit 2
fi
read -r -a simclr <<< "${SIMCLR:-simclr}"
gpus=()
if [[ -n "${GPUS:-}" ]]; then
    gpus=(--gpus "$GPUS")
fi

exec "${simclr[@]}" launch "${gpus[@]}" "$@"
