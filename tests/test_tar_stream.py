"""The shard reader's tar parser reads what `tarfile` reads, and refuses what it refuses."""
import gzip
import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.data.sources import iter_shard
from orchestrator.data.tar_stream import TarError, iter_files


def archive(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    """entries: (name, bytes) files, or (name, None) directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


LONG = "n" * 90 + "/" + "deep/" * 30 + "sample.jpg"  # > 100 bytes, and > 155 + 100 for ustar's prefix


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tar_format_reads_as_tarfile_reads_it(fmt):
    entries = [("dir", None), ("dir/a.jpg", b"\xff\xd8" + b"x" * 700), ("dir/a.cls", b"3"), ("empty.txt", b""),
               ("block.bin", b"z" * 512), ("u\u00e9.cls", b"7")]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append((LONG, b"long name"))  # GNU: an L entry; pax: a path record
    raw = archive(entries, fmt)
    assert list(iter_files(io.BytesIO(raw))) == reference(raw)
    assert [n for n, _ in iter_files(io.BytesIO(raw))][-1] == (LONG if fmt != tarfile.USTAR_FORMAT else "u\u00e9.cls")


def test_a_ustar_prefix_is_joined_to_the_name():
    name = "p" * 120 + "/file.cls"  # fits ustar only as prefix + name
    raw = archive([(name, b"1")], tarfile.USTAR_FORMAT)
    assert list(iter_files(io.BytesIO(raw))) == [(name, b"1")]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=150),
                          st.binary(max_size=2000)), max_size=6))
def test_any_archive_reads_as_tarfile_reads_it(entries):
    raw = archive(entries)
    assert list(iter_files(io.BytesIO(raw))) == reference(raw)


def test_a_truncated_stream_and_a_corrupt_header_are_errors():
    raw = archive([("a.jpg", b"x" * 1000), ("a.cls", b"1")])
    for cut in (100, 512 + 300, 1536 + 10):  # inside a header, a payload, the second header
        with pytest.raises(TarError, match="unexpected end"):
            list(iter_files(io.BytesIO(raw[:cut])))
    bad = bytearray(raw)
    bad[10] ^= 0xFF  # a byte of the first name: the checksum no longer matches
    with pytest.raises(TarError, match="checksum"):
        list(iter_files(io.BytesIO(bytes(bad))))


def test_a_shard_ends_at_its_zero_blocks_or_at_a_block_boundary(tmp_path):
    raw = archive([("k1.jpg", b"j1"), ("k1.cls", b"4"), ("k2.jpg", b"j2"), ("k2.cls", b"5")])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(raw + b"trailing garbage after the end marker"))
    (tmp_path / "s.tar").write_bytes(raw[:4 * 1024])  # four entries, no end-of-archive blocks at all
    got = [(s.key, s.data, s.label) for s in iter_shard(str(tmp_path / "s.tar.gz"))]
    assert got == [("k1", b"j1", 4), ("k2", b"j2", 5)]
    assert [(s.key, s.label) for s in iter_shard(str(tmp_path / "s.tar"))] == [("k1", 4), ("k2", 5)]
