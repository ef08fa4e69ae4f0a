"""Commands on finished runs: info, runs, export, plot, embed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from simclr_cli.cli import render
from simclr_cli.cli._app import (
    RUNS_PANEL,
    DebugOpt,
    OverwriteOpt,
    SourceArg,
    app,
    handle_errors,
    is_main_process,
    stage_command,
)
from simclr_cli.utils import check_out_folder


@app.command(rich_help_panel=RUNS_PANEL)
def info(
    path: Annotated[Path, typer.Argument(help="A checkpoint (model.safetensors), a stage folder, or a run "
                                              "directory or name (its pretrain checkpoint, else its newest stage's).")],
    debug: DebugOpt = False,
) -> None:
    """Show a checkpoint's metadata, key recipe values and final metrics."""
    with handle_errors(debug):
        from simclr_cli.inspect_runs import checkpoint_info, set_aside_runs

        for line in set_aside_runs(path):  # first: said even when the run holds no checkpoint now
            typer.echo(line, err=True)
        render.show_info(path, checkpoint_info(path))


@app.command(rich_help_panel=RUNS_PANEL)
def runs(
    root: Annotated[Path, typer.Option("--root", help="Folder holding the runs.")] = Path("runs"),
    debug: DebugOpt = False,
) -> None:
    """List the runs under ./runs: stages done, their key metrics, wall time."""
    with handle_errors(debug):
        from simclr_cli.inspect_runs import list_runs

        found = list_runs(root)
        if not found:
            print(f"no runs under {root}/ yet; start with: simclr pretrain quickstart")
            return
        render.show_runs(root, found)


@app.command(rich_help_panel=RUNS_PANEL)
def export(
    source: SourceArg = None,
    format_: Annotated[str, typer.Option("--format", help="timm: model.safetensors + config.json + model card "
                                                          "README.md; onnx: model.onnx with a dynamic batch "
                                                          "(the onnx extra).")] = "timm",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder to write (default RUN/export-FORMAT).")] = None,
    overwrite: OverwriteOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export the encoder: a timm folder (backbone-only model.safetensors, config.json, a model card README.md)
    or ONNX (model.onnx, checked against PyTorch with onnxruntime)."""
    with handle_errors(debug):
        from simclr_cli.errors import UsageError
        from simclr_cli.export import export_onnx, export_timm, require_onnx
        from simclr_cli.stages import common

        if format_ not in ("timm", "onnx"):
            raise UsageError(f"--format {format_}: choose timm or onnx")
        if format_ == "onnx":
            require_onnx()  # before looking for the run
        # A run directory or nothing: its pretrain encoder; a stage folder or file: that checkpoint.
        src = common.find_checkpoint(source, ("pretrain",) if source is None else ("pretrain", "finetune", "distill"),
                                     say=print if is_main_process() else (lambda *a: None))
        target = out or src.run_dir / f"export-{format_}"
        check_out_folder(target)
        if format_ == "onnx":
            config = export_onnx(src.checkpoint, target, overwrite=overwrite)
            print(f"wrote {target}/model.onnx and config.json ({config['architecture']}, input pixel_values "
                  f"(N, 3, {config['inputs']['pixel_values'][2]}, {config['inputs']['pixel_values'][3]}) normalized, "
                  f"output features (N, {config['num_features']}); onnxruntime matches PyTorch within "
                  f"{config['max_abs_diff_vs_pytorch']:.1e})")
            return
        config = export_timm(src.checkpoint, target, overwrite=overwrite, run_dir=src.run_dir)
        print(f"wrote {target}/model.safetensors, config.json and README.md ({config['architecture']}, "
              f"{config['num_features']} features)")
        if config["simclr"]["cifar_stem"]:
            print(f"load with: simclr_cli.export.load_timm('{target}')  (CIFAR stem)")
        else:
            print(f"load with: timm.create_model('local-dir:{target}', pretrained=True)")


@app.command(rich_help_panel=RUNS_PANEL)
def plot(
    source: SourceArg = None,
    embedding: Annotated[bool, typer.Option("--embedding", help="Also draw a 2-D map of h on the labeled val split, "
                                                                "coloured by label (paper Fig. B.4).")] = False,
    method: Annotated[str, typer.Option("--method", help="auto, pca or tsne (for --embedding); auto: t-SNE up "
                                                         "to 1000 points (seconds), PCA above.")] = "auto",
    max_points: Annotated[int, typer.Option("--max-points", help="Points in the embedding map (a seeded sample).")] = 2000,
    debug: DebugOpt = False,
) -> None:
    """Write PNG figures into RUN/plots/: training curves, pretrained vs random init, and the embedding map."""
    with handle_errors(debug):
        from simclr_cli import plots
        from simclr_cli.stages import common

        src = common.find_checkpoint(source, ("pretrain",), say=print)
        written = plots.plot_curves(src.run_dir)
        cmp = plots.plot_comparison(src.run_dir)
        written += [cmp] if cmp else []
        if embedding:
            from simclr_cli.embed import embedding_map

            written.append(embedding_map(src, method, max_points))
        if not written:
            print(f"nothing to plot in {src.run_dir} yet")
        for p in written:
            print(f"wrote {p}")


@stage_command("embed", panel=RUNS_PANEL)
def embed(
    source: SourceArg = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="A split of the recipe's dataset (e.g. val, train), a folder of images (class folders or "
                       "flat, any depth), a .txt/.csv list of image paths, or a pack folder (simclr data pack); "
                       "default: the recipe's training split.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .npy, or a folder for <data>.npy "
                                                                    "(default RUN/embed/<data>.npy); a .csv with "
                                                                    "paths and labels goes beside it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output .npy and .csv.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Thin wrapper over :func:`simclr_cli.embed.embed` (help: the registry's embed entry)."""
    with handle_errors(debug):
        from simclr_cli.embed import embed as embed_features

        main = is_main_process()  # under launch: one process says which run and split it embeds
        written = embed_features(source, data, out, overwrite, say=print if main else (lambda *a: None))
        if main:
            print(f"wrote {written.path} {written.shape} and {written.table}")
