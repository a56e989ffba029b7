"""The tar codec: headers parsed as tarfile parses them, and crafted archives (negative, huge or forged sizes,
bad checksums, truncation, oversized extended headers) rejected with ``tarfile.ReadError`` in bounded time,
never read outside the archive; through ingest, a malformed archive is one named error."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from dataengine.errors import InputCorruptError
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.tario import BLOCK, MAX_EXTENDED_BYTES, iter_members, scan_tar, ustar_header


def header(name: bytes, size_field: bytes, kind: bytes = b"0", checksum: bytes | None = None) -> bytes:
    """A raw ustar header block with any size field (12 bytes) and a correct checksum unless one is given."""
    block = bytearray(BLOCK)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = checksum if checksum is not None else b"%06o\0 " % sum(block)
    return bytes(block)


def archive(*blocks: bytes) -> bytes:
    return b"".join(blocks) + bytes(2 * BLOCK)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def good_member(name: bytes = b"a/ok.jpg") -> bytes:
    data = _jpeg()
    return header(name, b"%011o\0" % len(data)) + data + bytes(-len(data) % BLOCK)


CRAFTED = {
    "negative octal size": header(b"a/x.jpg", b"-0000000001\0") + bytes(BLOCK),
    "negative octal size -512": header(b"a/x.jpg", b"-0000001000\0"),  # pointed back at its own header
    "negative octal size on a long name": header(b"././@LongLink", b"-0000000777\0", b"L") + bytes(BLOCK),
    "negative base-256 size": header(b"a/x.jpg", b"\xff" * 12),
    "base-256 size of 2**60": header(b"a/x.jpg", b"\x80" + (2**60).to_bytes(11, "big")) + bytes(BLOCK),
    "octal size past the end": header(b"a/x.jpg", b"%011o\0" % (8**11 - 1)) + bytes(BLOCK),
    "bad checksum": header(b"a/x.jpg", b"%011o\0" % 10, checksum=b"0000000\0") + bytes(BLOCK),
    "checksum not octal": header(b"a/x.jpg", b"%011o\0" % 10, checksum=b"9999999\0") + bytes(BLOCK),
    "size not octal": header(b"a/x.jpg", b"00000000x10\0") + bytes(BLOCK),
    "huge long name": header(b"././@LongLink", b"%011o\0" % (MAX_EXTENDED_BYTES + 1), b"L") + bytes(BLOCK),
    "huge pax header": header(b"pax", b"\x80" + (2**60).to_bytes(11, "big"), b"x") + bytes(BLOCK),
    "pax size not a number": header(b"pax", b"%011o\0" % 512, b"x") + b"16 size=-12345\n".ljust(BLOCK, b"\0"),
    "truncated header": header(b"a/x.jpg", b"%011o\0" % 0)[:300],
    "member cut short": header(b"a/x.jpg", b"%011o\0" % 2000) + bytes(1000),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_headers_raise_read_error_in_bounded_time(tmp_path, name):
    data = good_member() + CRAFTED[name]
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    with pytest.raises(tarfile.ReadError):
        list(scan_tar(str(path)))
    with open(path, "rb") as handle, pytest.raises(tarfile.ReadError):
        list(iter_members(handle))  # a real file: a forged size must not allocate what it claims


def test_every_scanned_member_lies_inside_the_archive(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(archive(good_member(), good_member(b"b.jpg")))
    members = list(scan_tar(str(path)))
    assert [m[0] for m in members] == ["a/ok.jpg", "b.jpg"]
    assert all(offset + size <= len(path.read_bytes()) for _, offset, size in members)


def test_a_pax_size_record_is_honoured_as_tarfile_does(tmp_path):
    data = _jpeg()
    record = b"size=%d\n" % len(data)
    record = b"%d %s" % (len(record) + 3, record)  # "<len> size=N\n", len counting itself (2 digits + space)
    pax = header(b"pax", b"%011o\0" % len(record), b"x") + record.ljust(BLOCK, b"\0")
    member = header(b"big.jpg", b"%011o\0" % 0) + data + bytes(-len(data) % BLOCK)  # the ustar size says 0
    path = tmp_path / "t.tar"
    path.write_bytes(archive(pax, member, good_member()))
    with tarfile.open(path) as reference:
        expected = [(m.name, m.offset_data, m.size) for m in reference if m.isfile()]
    assert list(scan_tar(str(path))) == expected and expected[0][2] == len(data)
    with open(path, "rb") as handle:
        assert [(n, len(d)) for n, d in iter_members(handle)] == [(n, s) for n, _, s in expected]


def test_signed_checksums_of_old_writers_are_accepted(tmp_path):
    block = bytearray(header("caf\u00e9.jpg".encode(), b"%011o\0" % 0))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    path = tmp_path / "t.tar"
    path.write_bytes(archive(bytes(block)))
    assert list(scan_tar(str(path))) == [("caf\u00e9.jpg", BLOCK, 0)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["negative octal size -512", "base-256 size of 2**60", "bad checksum",
                                  "member cut short"])
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_ingest_of_a_crafted_archive_is_one_named_error(tmp_path, name, suffix):
    data = good_member() + CRAFTED[name]
    path = tmp_path / f"t{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)
    with pytest.raises(InputCorruptError, match=r"images tar .*t\.tar"):
        run_ingest(IngestConfig(images=str(path), out=str(tmp_path / "out"), workers=0))


@pytest.mark.timeout(120)
def test_a_truncated_tar_gz_is_one_named_error(tmp_path):
    data = gzip.compress(archive(*(good_member(b"%d.jpg" % i) for i in range(20))))
    path = tmp_path / "t.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputCorruptError, match="images tar"):
        run_ingest(IngestConfig(images=str(path), out=str(tmp_path / "out"), workers=0))


def test_the_command_prints_one_line_for_a_malformed_archive(tmp_path):
    (tmp_path / "t.tar").write_bytes(archive(good_member(), CRAFTED["bad checksum"]))
    result = subprocess.run([sys.executable, "-m", "dataengine", "ingest", "--images", str(tmp_path / "t.tar"),
                             "--out", str(tmp_path / "out"), "--workers", "0"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "bad checksum" in result.stderr


def test_written_headers_read_back():
    data = b"x" * 700
    member = ustar_header("k.jpg", len(data)) + data + bytes(-len(data) % BLOCK)
    assert list(iter_members(io.BytesIO(archive(member)))) == [("k.jpg", data)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_header_scan_matches_tarfile(tmp_path, fmt):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as archive:
        for name in ("a/b.jpg", "d" * 60 + "/" + "e" * 80 + ".jpg", "x" * 150 + ".jpg", "caf\u00e9/\u6771.jpg"):
            if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name:
                continue  # not representable in plain ustar
            info = tarfile.TarInfo(name)
            data = name.encode() * 3
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as archive:
        expected = [(m.name, m.offset_data, m.size) for m in archive if m.isfile()]
        contents = [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    assert list(scan_tar(str(path))) == expected and expected
    with open(path, "rb") as handle:
        assert list(iter_members(handle)) == contents




def test_tar_readers_reject_corrupt_headers_and_truncated_members(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name in ("a.jpg", "a.json"):
            info = tarfile.TarInfo(name)
            info.size = 700
            archive.addfile(info, io.BytesIO(b"x" * 700))
    data = path.read_bytes()
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(data[:1536] + b"garbage" + data[1543:])  # inside the second header
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:1536 + 512 + 100])  # the second member's data cut short
    for bad in (corrupt, truncated):
        with open(bad, "rb") as handle, pytest.raises(tarfile.ReadError):
            list(iter_members(handle))
    with pytest.raises(tarfile.ReadError):
        list(scan_tar(str(corrupt)))
