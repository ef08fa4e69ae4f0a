"""Damaged packs and foreign tars (issue 19, section C, and item 15): USTAR prefix names, the descriptor lock
after a fork, and packs whose shards were truncated or damaged on disk."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading

import numpy as np
from PIL import Image

from simclr_cli.data.shards import writer as shards
from simclr_cli.data.shards.reader import ShardSource
from simclr_cli.data.shards.writer import write_index


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _foreign_tar(path, names):
    """A tar written by another tool, USTAR format: a path over 100 characters is split into prefix + name."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, name in enumerate(names):
            data = _jpeg(i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_foreign_tar_members_with_101_to_103_character_paths_are_read(tmp_path):
    """Item 9: USTAR stores such a path as prefix (before the last fitting '/') + name; the member name is the two
    joined, as tarfile reads it, not the name field alone."""
    out = tmp_path / "pack"
    out.mkdir()
    names = [f"{'d' * 60}/{str(i) * (n - 66)}.jpeg" for i, n in enumerate((101, 102, 103))]
    assert [len(n) for n in names] == [101, 102, 103]
    _foreign_tar(out / "shard-000000.tar", names)
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames() == names
    write_index(out, say=lambda s: None)
    ds = ShardSource(out)
    assert len(ds) == 3
    for i in range(3):
        assert ds.raw(i) == _jpeg(i)
        assert ds.load(i).shape == (3, 12, 10)


def test_a_forked_worker_does_not_wait_on_a_lock_held_at_the_fork(tmp_path):
    """Item 15: ``raw`` must swap in the worker's own lock before taking it. A lock held by another thread at the
    fork stays held in the child forever, so taking it first hangs the worker."""
    out = tmp_path / "pack"
    out.mkdir()
    _foreign_tar(out / "shard-000000.tar", ["a.jpg", "b.jpg"])
    write_index(out, say=lambda s: None)
    ds = ShardSource(out)
    ds._lock.acquire()  # another thread of the parent held it at the fork
    ds._pid = -1  # as seen from a forked worker: another process id
    got: list = []
    reader = threading.Thread(target=lambda: got.append(ds.raw(1)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    stuck = reader.is_alive()
    if stuck:
        ds._lock.release()  # let the stuck thread end
    assert not stuck, "raw() waited on the lock inherited from the parent"
    assert got == [_jpeg(1)] and ds._pid == os.getpid()


def _pack_cli(src, out):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    return CliRunner().invoke(app, ["data", "pack", str(src), str(out), "--shorter-side", "16", "--quality", "90",
                                    "--shard-size", "3", "--workers", "0", "--quiet"])


def _index_cli(out, *extra):
    from typer.testing import CliRunner

    from simclr_cli.cli import app

    return CliRunner().invoke(app, ["data", "index", str(out), *extra])


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_truncated_shard_is_never_indexed_short_silently_and_a_repack_restores_it(tmp_path):
    """Item 7: the advice for a truncated shard was `simclr data index`, which indexed the readable part without a
    word, and `simclr data pack` then said "already packed" for good: images lost."""
    from tests.data.test_shards import _labeled

    src, out = _labeled(tmp_path / "src"), tmp_path / "out"
    assert _pack_cli(src, out).exit_code == 0
    whole = _files(out)
    shard = out / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        last_jpg = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1]
    with open(shard, "r+b") as f:  # cut inside the last image: it is lost, the two before it are whole
        f.truncate(last_jpg.offset_data + 10)
    again = f"simclr data pack {src} {out} --shorter-side 16 --quality 90 --shard-size 3"
    # training names the pack command while the source exists
    try:
        ShardSource(out)
    except Exception as e:  # noqa: BLE001 - checked below
        message = str(e)
    assert f"{shard} has" in message and again in message and "data index" not in message
    # `data index` refuses to shrink the pack and gives the same advice
    r = _index_cli(out)
    assert r.exit_code == 2 and str(shard) in r.output and again in r.output, r.output
    assert (out / "index.json").read_bytes() == whole["index.json"]
    # forced with --partial: it names what is lost
    r = _index_cli(out, "--partial")
    assert r.exit_code == 0, r.output
    assert f"warning: --partial: {shard} has" in r.output and "1 of its 3 images are lost" in r.output, r.output
    kept = len(json.loads((out / "index.json").read_text())["samples"]["key"])
    assert kept == 6 and "now holds 6 of the 7 images the pack held: 1 image(s) left out" in r.output
    # a pack run again notices the damage (the index now matches the short shard) and writes the shard again
    r = _pack_cli(src, out)
    assert r.exit_code == 0 and "already packed" not in r.output, r.output
    assert _files(out) == whole  # byte for byte the original pack
    r = _pack_cli(src, out)
    assert r.exit_code == 0 and "already packed" in r.output


def test_a_same_size_shard_with_a_damaged_header_is_written_again(tmp_path):
    """Item 8: 20 bytes XORed in a member header keep the size; tarfile stops there silently as if the tar ended."""
    from tests.data.test_shards import _labeled

    src, out = _labeled(tmp_path / "src"), tmp_path / "out"
    assert _pack_cli(src, out).exit_code == 0
    whole = _files(out)
    shard = out / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[3].offset  # the second sample's first member
    data = bytearray(shard.read_bytes())
    for i in range(header + 100, header + 120):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == len(whole["shard-000000.tar"])
    assert shards.shard_problem(shard, None).startswith("does not read as a tar")
    r = _index_cli(out)
    assert r.exit_code == 2 and str(shard) in r.output and "data pack" in r.output, r.output
    r = _pack_cli(src, out)
    assert r.exit_code == 0 and "already packed" not in r.output, r.output
    assert _files(out) == whole


def test_with_the_source_gone_the_advice_is_data_index_partial(tmp_path):
    import shutil

    from tests.data.test_shards import _labeled

    src, out = _labeled(tmp_path / "src"), tmp_path / "out"
    assert _pack_cli(src, out).exit_code == 0
    shutil.rmtree(src)
    with open(out / "shard-000002.tar", "r+b") as f:
        f.truncate(1000)
    r = _index_cli(out)
    assert r.exit_code == 2 and f"its source {src} is gone" in r.output and f"simclr data index {out} --partial" in r.output
    r = _index_cli(out, "--partial")
    assert r.exit_code == 0 and "warning: --partial:" in r.output and "images are lost" in r.output, r.output
    assert len(ShardSource(out)) < 7
