"""Regular-file members of a tar stream, read with large reads and a minimal header parser.

Why not `tarfile`: in stream mode ("r|gz") it builds a TarInfo per member through many small
reads and field conversions. On the 64-px shards (two members per sample, about 2.5 kB
each) that was 70 us per member, 1.4 s of the 23 s a 10,000-image recompute takes on two
cores (bench/recompute_bench.py), and about a second per member start in tests. This parser
reads 1 MiB at a time and decodes only what a shard needs: name, size, type, checksum.

Formats: POSIX ustar (name prefix), pax extended headers (`path`, `size`), GNU long names
(typeflag L), base-256 sizes; other entries (directories, links) are skipped. A bad header
checksum or a stream that ends inside a header or payload raises `TarError`, as tarfile
would; a stream that ends on a block boundary, or at an all-zero block, ends the archive.
Format reference: POSIX.1-2001 `pax` ("ustar Interchange Format", "pax Interchange Format").
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

BLOCK = 512
CHUNK = 1 << 20
REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file
_SIGNED = struct.Struct("148b8x356b")  # checksum over signed bytes: some old writers used it


class TarError(Exception):
    pass


class _Buffer:
    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.pos = f, b"", 0

    def take(self, n: int) -> bytes | None:
        """The next n bytes; None when the stream ended exactly here."""
        while len(self.buf) - self.pos < n:
            chunk = self.f.read(CHUNK)
            if not chunk:
                if self.pos == len(self.buf):
                    return None
                raise TarError("unexpected end of data")
            self.buf = self.buf[self.pos:] + chunk
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def payload(self, size: int) -> bytes:
        data = self.take(size) if size else b""
        if data is None:
            raise TarError("unexpected end of data")
        if size % BLOCK and self.take(BLOCK - size % BLOCK) is None:
            raise TarError("unexpected end of data")
        return data


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarError(f"invalid number field {field!r}") from None


def _check(header: bytes) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored != unsigned and stored != sum(_SIGNED.unpack(header)) + 8 * 32:
        raise TarError("bad checksum")


def _pax(data: bytes) -> dict[bytes, bytes]:
    """`<length> <key>=<value>\\n` records."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key] = value
        pos = end
    return out


def _name(header: bytes) -> bytes:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name


def iter_files(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in the (uncompressed) tar stream `f`."""
    buf = _Buffer(f)
    override: dict[bytes, bytes] = {}  # from a pax or GNU header, for the next entry only
    while True:
        header = buf.take(BLOCK)
        if header is None or not header.strip(b"\0"):
            return
        _check(header)
        kind = header[156:157]
        size = int(override[b"size"]) if b"size" in override else _number(header[124:136])
        data = buf.payload(size)
        if kind == b"x":
            try:
                override = _pax(data)
            except ValueError:
                raise TarError("malformed pax header") from None
        elif kind == b"L":
            override = {b"path": data.split(b"\0", 1)[0]}
        elif kind in REGULAR:
            yield override.get(b"path", _name(header)).decode("utf-8", "surrogateescape"), data
            override = {}
        elif kind != b"g":  # directories, links, devices: nothing to read
            override = {}
