"""Ingest sources under hostile input: names from metadata, symlinks, non-regular files, filesystem errors,
over-long lines and over-large files. Every such row ends with a status; nothing escapes the images root,
hangs, or stops the run."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest
from PIL import Image

from dataengine import sources
from dataengine.fs import iter_lines
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.sources import Fetcher, Row, iter_rows
from dataengine.yfcc import FIELDS_25, MAX_LINE_BYTES


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (seed % 256, 40, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _line(photo_id, **fields: str) -> bytes:
    values = {name: "" for name in FIELDS_25}
    values.update(photo_id=str(photo_id), extension_original="jpg", marker="0")
    values.update(fields)
    return "\t".join(values[name] for name in FIELDS_25).encode()


def _fetch_yfcc(root, *lines: bytes):
    fetcher = Fetcher(str(root), download=False, storage_options={})
    return fetcher.fetch_block([Row(i, line=line) for i, line in enumerate(lines)])


def test_names_from_metadata_cannot_leave_the_images_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "777.d").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg(1))
    escapes = ["d/../../outside/secret.jpg", "d/../../outside/secret", "d\\..\\..\\outside\\secret.jpg"]
    lines = [_line(777, extension_original=ext) for ext in escapes]
    lines.append(_line(778, extension_original="", download_url="http://h/x/..%2F..%2Foutside%2Fsecret.jpg"))
    lines.append(_line(779, extension_original="", download_url="http://h/x/..%2F%2E%2E%2Foutside%2Fsecret.jpg"))
    items = _fetch_yfcc(root, *lines)
    assert [(i.status, i.data) for i in items] == [("missing", None)] * len(lines)
    assert all("contains a path separator" in i.error for i in items[:3])  # the URL's basename is taken


def test_symlinks_are_followed_only_inside_the_images_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(_jpeg(1))
    (root / "real" / "inside.jpg").write_bytes(_jpeg(2))
    os.symlink(outside / "secret.jpg", root / "1.jpg")  # a file symlink leaving the root
    os.symlink(outside, root / "sub")  # a folder symlink leaving the root (folder source)
    os.symlink("real/inside.jpg", root / "2.jpg")  # a symlink that stays inside
    os.symlink("3.jpg", root / "3.jpg")  # a loop
    items = _fetch_yfcc(root, _line(1), _line(2), _line(3))
    assert [i.status for i in items] == ["missing", "ok", "missing"]
    assert "outside the images root" in items[0].error and items[1].data == _jpeg(2)
    # The same rules for an image folder: its listing holds the symlinks, reading refuses the escaping ones.
    (root / "sub2").mkdir()
    os.symlink(outside / "secret.jpg", root / "sub2" / "leak.jpg")
    fetcher = Fetcher(str(root), download=False, storage_options={})
    rows = list(iter_rows(None, str(root), {}))
    statuses = {row.path: item.status for row, item in zip(rows, fetcher.fetch_block(rows))}
    assert statuses == {"1.jpg": "missing", "2.jpg": "ok", "3.jpg": "missing", "real/inside.jpg": "ok",
                        "sub2/leak.jpg": "missing"}, statuses


@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_not_opened_for_reading(tmp_path):
    """A FIFO (no writer) used to block the worker forever in open()."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg").write_bytes(_jpeg(0))
    os.mkfifo(root / "a" / "1.jpg")
    os.mkfifo(root / "5.jpg")
    result = run_ingest(IngestConfig(images=str(root), out=str(tmp_path / "out"), workers=0))
    assert result.counts["ok"] == 1 and result.counts["corrupt"] == 2
    items = _fetch_yfcc(root, _line(5))
    assert items[0].status == "corrupt" and "not a regular file" in items[0].error


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_its_rows_status(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "0.jpg").write_bytes(_jpeg(0))
    (root / "1.jpg").write_bytes(_jpeg(1))
    os.chmod(root / "1.jpg", 0)
    result = run_ingest(IngestConfig(images=str(root), out=str(tmp_path / "out"), workers=0))
    assert result.counts["ok"] == 1 and result.counts["missing"] == 1


def test_per_file_errors_are_row_statuses_and_storage_errors_stop_the_run(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "1.jpg").write_bytes(_jpeg(1))
    real_open = os.open

    def failing(errno_value):
        def fake(path, *args, **kwargs):
            if str(path).endswith("1.jpg"):
                raise OSError(errno_value, os.strerror(errno_value), path)
            return real_open(path, *args, **kwargs)
        return fake

    import errno

    for per_file in (errno.EACCES, errno.ELOOP, errno.ENAMETOOLONG, errno.EPERM):
        monkeypatch.setattr(sources.os, "open", failing(per_file))
        items = _fetch_yfcc(root, _line(1))
        assert items[0].status == "missing" and os.strerror(per_file) in items[0].error
    monkeypatch.setattr(sources.os, "open", failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output"):
        _fetch_yfcc(root, _line(1))


def test_files_larger_than_the_limit_are_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "1.jpg").write_bytes(b"\xff" * 1001)
    (root / "2.jpg").write_bytes(_jpeg(2))
    items = _fetch_yfcc(root, _line(1), _line(2))
    assert items[0].status == "corrupt" and "1001 bytes" in items[0].error and items[0].data is None
    assert items[1].status == "ok"
    with tarfile.open(tmp_path / "t.tar", "w") as archive:
        for name in ("1.jpg", "2.jpg"):
            archive.add(root / name, arcname=name)
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress((tmp_path / "t.tar").read_bytes()))
    for tar in ("t.tar", "t.tar.gz"):
        rows = list(iter_rows(None, str(tmp_path / tar), {}))
        items = Fetcher(str(tmp_path / tar), download=False, storage_options={}).fetch_block(rows)
        assert [i.status for i in items] == ["corrupt", "ok"] and rows[0].data in (None, b"")


def test_an_over_long_metadata_line_is_one_bad_row_and_is_never_held_whole(tmp_path):
    huge = b"x" * (3 * MAX_LINE_BYTES)  # no newline for 3 MiB
    data = _line(1) + b"\n" + huge + b"\t" * 24 + b"\n" + _line(2) + b"\n"
    (tmp_path / "m.tsv").write_bytes(data)
    lines = list(iter_lines(str(tmp_path / "m.tsv"), max_bytes=MAX_LINE_BYTES))
    assert [len(line) for line in lines] == [len(_line(1)), MAX_LINE_BYTES + 1, len(_line(2))]
    items = _fetch_yfcc(tmp_path, *lines)
    assert items[1].status == "bad_metadata" and "longer than" in items[1].error
    assert [i.key for i in items] == ["1", None, "2"]


def test_a_folder_named_like_the_photo_is_skipped_without_leaking_a_descriptor(tmp_path):
    root = tmp_path / "root"
    (root / "3.d").mkdir(parents=True)
    (root / "3.jpg").write_bytes(_jpeg(3))
    before = len(os.listdir("/proc/self/fd"))
    items = _fetch_yfcc(root, *[_line(3, extension_original="d")] * 50)
    assert [i.status for i in items] == ["ok"] * 50 and items[0].metadata["source"] == "3.jpg"
    assert len(os.listdir("/proc/self/fd")) == before


def test_file_names_that_are_not_utf8_are_rows_like_any_other(tmp_path):
    """A file named with bytes that are not UTF-8 used to stop the run (the key and ledger could not encode it)."""
    root = tmp_path / "imgs"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "ok.jpg").write_bytes(_jpeg(1))
    with open(os.path.join(os.fsencode(root), b"cls", b"\xff\xfe.jpg"), "wb") as handle:
        handle.write(_jpeg(2))
    os.mkfifo(os.path.join(os.fsencode(root), b"cls", b"\xfd.jpg"))
    result = run_ingest(IngestConfig(images=str(root), out=str(tmp_path / "out"), workers=0))
    assert result.counts["ok"] == 2 and result.counts["corrupt"] == 1
    ledger = (tmp_path / "out" / "ledger.jsonl").read_text(encoding="utf-8")
    assert "cls/\ufffd.jpg: not a regular file" in ledger
