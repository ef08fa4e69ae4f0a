"""``simclr data pack`` and ``simclr data index``: a dataset into indexed WebDataset tar shards (thin wrappers; the
work is in :mod:`simclr_cli.data.shards`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from simclr_cli import threads
from simclr_cli.cli._app import DebugOpt, QuietOpt, data_app, handle_errors

if TYPE_CHECKING:
    from simclr_cli.data.shards.writer import PackResult
    from simclr_cli.engine.reporting import ProgressDisplay


@data_app.command("pack")
def data_pack(
    src: Annotated[Path, typer.Argument(help="A folder of images (any depth; class folders give labels) or a "
                                             ".txt/.csv list of image paths.")],
    out: Annotated[Path, typer.Argument(help="The pack folder: new, empty, or an interrupted pack to resume.")],
    shorter_side: Annotated[int, typer.Option("--shorter-side", help="Scale images down so that the shorter side "
                                                                    "is this many pixels (never up).")] = 256,
    quality: Annotated[int, typer.Option("--quality", help="JPEG quality of the packed images (1-95).")] = 90,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard.")] = 1000,
    labels: Annotated[str, typer.Option("--labels", help="auto: from class folders when SRC holds only "
                                                        "sub-folders | folders | none.")] = "auto",
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes that decode and encode "
                                                                    "(default: the CPUs this process may use, its thread budget; 0: this one).")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="A list naming missing files: pack the "
                                                                       "rest (warns).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a pack of another source or other "
                                                               "settings in OUT.")] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pack images into WebDataset shards with a random-access index (train with data.dataset=shards).

    Images are decoded upright, scaled to the shorter side and re-encoded once. An interrupted pack keeps its
    completed shards: run the same command again to resume.
    """
    with handle_errors(debug):
        from simclr_cli.data.shards.writer import PackSettings, pack
        from simclr_cli.errors import UsageError

        if labels not in ("auto", "folders", "none"):
            raise UsageError(f"--labels must be auto, folders or none, got '{labels}'")
        if workers is not None and workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {workers}")
        report = _PackReport(quiet)
        try:
            result = pack(src, out, PackSettings(shorter_side, quality, shard_size), labels=labels,  # type: ignore[arg-type]
                          overwrite=overwrite, workers=threads.prepare_process().decode_threads() if workers is None else workers,
                          allow_missing=allow_missing, say=report.say, progress=report.progress)
        finally:
            report.close()
        report.done(result)


class _PackReport:
    """What ``data pack`` shows while it packs: a progress bar (a line every tenth of the images in a log), its
    messages, and the result. ``--quiet`` drops the bar and the progress, never a warning."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Optional[ProgressDisplay] = None
        self.every = 1

    def progress(self, done: int, total: int) -> None:
        if self.bar is None:
            from simclr_cli.engine.reporting import ProgressDisplay

            self.bar = ProgressDisplay(total, done, enabled=not self.quiet, description="pack", unit="images")
            self.every = max(1, total // 10)
        line = f"packed {done}/{total} images" if done % self.every == 0 or done == total else None
        self.bar.update(done, "", line)

    def say(self, text: str) -> None:
        if self.quiet and text.startswith("warning:"):
            typer.echo(text, err=True)
        elif self.bar is not None:
            self.bar.message(text)
        elif text.startswith("warning:"):
            typer.echo(text, err=True)
        elif not self.quiet:
            typer.echo(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def done(self, result: PackResult) -> None:
        if result.already:
            print(f"{result.out}: already packed ({result.images} images in {result.shards} shards); nothing to do")
        else:
            kept = f", {result.reused} kept from the interrupted run" if result.reused else ""
            skipped = f", {result.skipped} unreadable images skipped (each named in a warning)" if result.skipped else ""
            print(f"packed {result.images} images into {result.shards} shards in {result.out}{kept}{skipped}")
        if not self.quiet:
            print(f"train on them: --set data.dataset=shards --set data.root={result.out}")


@data_app.command("index")
def data_index(
    out: Annotated[Path, typer.Argument(help="A pack folder (shard-NNNNNN.tar files).")],
    partial: Annotated[bool, typer.Option("--partial", help="Index the shards that are there even when the pack "
                                          "has fewer than its pack.json plans (interrupted, or shards lost); "
                                          "it then holds fewer images.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild a pack's index.json by reading its shards (after it was lost, or the shards were changed)."""
    with handle_errors(debug):
        from simclr_cli.data.shards.writer import write_index

        index = write_index(out, say=lambda text: typer.echo(text, err=text.startswith("warning:")), partial=partial)
        print(f"indexed {len(index['samples']['key'])} images in {len(index['shards'])} shards: "
              f"{Path(out).expanduser().absolute() / 'index.json'}")
