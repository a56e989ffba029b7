"""YFCC100M metadata parser: both layouts, decoding, missing values, hostile values (the fuzz suite is in
test_fuzz.py)."""

from __future__ import annotations

import bz2
import gzip

import pytest

from dataengine import yfcc

LINE_25 = "\t".join([
    "7", "6985418911", "8b3ad7b4e2d1c5d5bcb4f5e2f7d1e9a0", "39089491@N00", "Mar%C3%ADa+L%C3%B3pez",
    "2012-03-18 14:02:11.0", "1332103331", "Canon+EOS+5D+Mark+II", "Sunset+at+the+pier",
    "A+very+%3Cb%3Elong%3C%2Fb%3E+description", "sunset,san+francisco,caf%C3%A9,2012",
    "geo%3Alat%3D37.8,exif%3Aiso%3D100", "-122.419416", "37.774929", "16",
    "http://www.flickr.com/photos/39089491@N00/6985418911/",
    "http://farm8.staticflickr.com/7206/6985418911_0123abcd.jpg", "Attribution+License",
    "http://creativecommons.org/licenses/by/2.0/", "7206", "8", "0123abcd", "fedc9876", "jpg", "0",
])


def test_parses_the_25_field_layout():
    record = yfcc.parse_line(LINE_25.encode())
    assert isinstance(record, yfcc.YfccRecord)
    assert record.line_number == 7 and record.photo_id == 6985418911
    assert record.photo_hash == "8b3ad7b4e2d1c5d5bcb4f5e2f7d1e9a0"
    assert record.user == "39089491@N00" and record.nickname == "María López"
    assert record.date_taken == "2012-03-18 14:02:11" and record.date_uploaded == 1332103331
    assert record.device == "Canon EOS 5D Mark II"
    assert record.description == "A very <b>long</b> description"
    assert record.tags == ["sunset", "san francisco", "café", "2012"]
    assert record.machine_tags == ["geo:lat=37.8", "exif:iso=100"]
    assert (record.lon, record.lat, record.accuracy) == (-122.419416, 37.774929, 16)
    assert record.license == "Attribution License" and record.extension_original == "jpg"
    assert record.marker == 0 and not record.is_video


def test_parses_the_23_field_webscope_layout():
    fields = LINE_25.split("\t")
    record = yfcc.parse_line("\t".join([fields[1]] + fields[3:]))
    assert isinstance(record, yfcc.YfccRecord)
    assert record.photo_id == 6985418911 and record.line_number is None and record.photo_hash is None
    assert record.tags == ["sunset", "san francisco", "café", "2012"]


def _with(**changes):
    fields = LINE_25.split("\t")
    for name, value in changes.items():
        fields[yfcc.FIELDS_25.index(name)] = value
    return "\t".join(fields)


def test_empty_gps_tags_and_device_are_missing_values():
    record = yfcc.parse_line(_with(longitude="", latitude="", accuracy="", user_tags="", machine_tags="", device=""))
    assert (record.lon, record.lat, record.accuracy) == (None, None, None)
    assert record.tags == [] and record.machine_tags == [] and record.device is None


@pytest.mark.parametrize("raw", ["1900-01-01 00:00:00.0", "2032-07-04 10:00:00.0", "0000-00-00 00:00:00.0", "garbage"])
def test_bogus_dates_are_kept_raw_only(raw):
    record = yfcc.parse_line(_with(date_taken=raw.replace(" ", "+")))
    assert record.date_taken is None and record.date_taken_raw == raw


def test_video_marker():
    assert yfcc.parse_line(_with(marker="1")).is_video


def test_non_utf8_bytes_are_replaced_not_fatal():
    line = LINE_25.encode().replace(b"Sunset", b"Sun\xff\xfeset")
    record = yfcc.parse_line(line)
    assert isinstance(record, yfcc.YfccRecord) and "\ufffd" in record.title


@pytest.mark.parametrize("line, reason", [
    ("", "fields"),
    ("a\tb\tc", "fields"),
    (LINE_25 + "\textra", "fields"),
    (_with(photo_id="abc"), "photo id"),
    (_with(longitude="east", latitude="north"), "coordinates"),
    (_with(latitude="97.5"), "out of range"),
    (_with(marker="7"), "marker"),
])
def test_bad_lines_give_a_reason(line, reason):
    result = yfcc.parse_line(line)
    assert isinstance(result, yfcc.BadLine) and reason in result.reason


@pytest.mark.parametrize("suffix, opener", [("", open), (".gz", gzip.open), (".bz2", bz2.open)])
def test_iter_records_reads_plain_gz_and_bz2(tmp_path, suffix, opener):
    path = tmp_path / f"meta.tsv{suffix}"
    with opener(path, "wb") as handle:
        handle.write((LINE_25 + "\n" + _with(photo_id="42", marker="1") + "\n").encode())
    records = list(yfcc.iter_records(str(path)))
    assert [r.photo_id for r in records] == [6985418911, 42]


# ---------------------------------------------------------------------------------------- hostile values

INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("photo_id", ["+42", " 42", "42 ", "0042", "\u0664\u0662", "4_2", "-0", "1e3", str(INT64_MAX + 1),
                                      str(2**64), "9" * 400])
def test_only_canonical_ascii_digit_photo_ids_are_accepted(photo_id):
    result = yfcc.parse_line(_with(photo_id=photo_id))
    assert isinstance(result, yfcc.BadLine) and "photo id" in result.reason, result


def test_the_largest_int64_photo_id_is_accepted():
    assert yfcc.parse_line(_with(photo_id=str(INT64_MAX))).photo_id == INT64_MAX
    assert yfcc.parse_line(_with(photo_id="0")).photo_id == 0


@pytest.mark.parametrize("name, value", [("accuracy", "3000000000"), ("accuracy", str(2**31)), ("accuracy", "-1"),
                                         ("date_uploaded", str(2**63)), ("date_uploaded", "-" + str(2**63 + 1)),
                                         ("line_number", str(2**64)), ("date_uploaded", "+5"),
                                         ("accuracy", "\u0663"), ("date_uploaded", " 12")])
def test_integers_that_do_not_fit_their_column_are_missing_values(name, value):
    record = yfcc.parse_line(_with(**{name: value}))
    attribute = {"line_number": "line_number", "date_uploaded": "date_uploaded", "accuracy": "accuracy"}[name]
    assert isinstance(record, yfcc.YfccRecord) and getattr(record, attribute) is None


def test_integers_at_their_column_limits_are_kept():
    record = yfcc.parse_line(_with(accuracy=str(2**31 - 1), date_uploaded=str(INT64_MAX)))
    assert record.accuracy == 2**31 - 1 and record.date_uploaded == INT64_MAX


@pytest.mark.parametrize("marker", ["+1", " 0", "\u0661", "01"])
def test_non_canonical_markers_are_bad_lines(marker):
    assert isinstance(yfcc.parse_line(_with(marker=marker)), yfcc.BadLine)


def test_a_byte_order_mark_does_not_spoil_the_first_line():
    fields = LINE_25.split("\t")
    webscope = "\t".join([fields[1]] + fields[3:])  # the 23-field layout starts with the photo id
    for line in ("\ufeff" + webscope, b"\xef\xbb\xbf" + webscope.encode()):
        assert yfcc.parse_line(line).photo_id == 6985418911
