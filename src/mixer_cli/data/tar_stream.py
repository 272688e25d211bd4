"""A lean reader of tar streams for the shard pipelines: the members' names and bytes, in order.

Python's `tarfile`, which webdataset reads shards with, builds a TarInfo per member and
parses every header field; on shards of small images (two members of a few hundred bytes per
sample) that was a third of a loader worker's time. This reads what a pipeline needs (name,
size, type) from each 512-byte header, still checks each header's checksum, and follows the
formats shards are written in: ustar and GNU headers, PAX and GNU long names, base-256 sizes,
and gzip, bzip2 or xz compression. A damaged or truncated stream raises `tarfile.ReadError`
after the members before the damage (the pipelines skip the rest of that shard).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator

from webdataset.tariterators import group_by_keys, url_opener

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES, less GNU sparse files (refused below)
PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
COMPRESSED = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f), b"BZh": bz2.BZ2File, b"\xfd7zXZ": lzma.LZMAFile}
META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (`__key__`, ...): never sample fields


class Prefixed:
    """A stream whose first bytes were already read: them, then the rest."""

    def __init__(self, head: bytes, rest):
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n < 0:
            out, self.head = self.head + self.rest.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + self.rest.read(n - len(out)) if len(out) < n else out


def uncompressed(stream):
    """The tar stream itself, from a plain or a gzip/bzip2/xz-compressed one."""
    head = stream.read(BLOCK)
    for magic, opener in COMPRESSED.items():
        if head.startswith(magic):
            return opener(Prefixed(head, stream))
    return Prefixed(head, stream)


def read_exactly(stream, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"unexpected end of data: {what} has {len(data)} of {n} bytes")
    return data


def number(field: bytes) -> int:
    """A header's numeric field: octal text, or base-256 where the first byte's high bit is set (GNU)."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid header: numeric field {field!r}") from None


def text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def checksum_ok(header: bytes) -> bool:
    """The stored checksum against the header's bytes with the checksum field as spaces, summed as
    unsigned (POSIX) or signed (some old writers) bytes."""
    stored = number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:])
    return stored == signed


def pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records of a PAX extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order."""
    for name, _, _, data in walk(uncompressed(stream)):
        yield name, data


def member_spans(file) -> Iterator[tuple[str, int, int]]:
    """(name, start, end) of each regular file of an uncompressed tar file open for reading: its bytes
    from its first header (extension headers included) to the end of its data, which is skipped,
    not read. Those bytes alone are a tar stream that `members` reads."""
    for name, start, end, _ in walk(file, read=False):
        yield name, start, end


def walk(stream, read: bool = True) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, start, end, bytes) of each regular file; without `read`, the data is seeked over (None)."""
    long_name, pax, pos, start = None, {}, 0, 0
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or not any(header):  # the end-of-archive blocks, or an archive without them
            if header and any(header):
                raise tarfile.ReadError(f"truncated header ({len(header)} of {BLOCK} bytes)")
            return
        if not checksum_ok(header):
            raise tarfile.ReadError("invalid header: bad checksum")
        kind = header[156:157]
        extension = kind in (PAX, GLOBAL_PAX, GNU_LONGNAME, GNU_LONGLINK)  # headers about the next member
        size = int(pax["size"]) if "size" in pax and not extension else number(header[124:136])  # past 8 GiB
        padded = size + -size % BLOCK
        pos += BLOCK + padded
        if read or extension:
            data = read_exactly(stream, padded, "member")[:size]
        else:
            data = None
            stream.seek(padded, 1)
        if kind == PAX:
            pax = pax_records(data)
            continue
        if kind == GNU_LONGNAME:
            long_name = text(data)
            continue
        if kind in (GLOBAL_PAX, GNU_LONGLINK):
            continue
        if kind == GNU_SPARSE or any(k.startswith("GNU.sparse") for k in pax):
            raise tarfile.ReadError("GNU sparse members are not supported in shards")
        name = pax.get("path") or long_name or text(header[:100])
        prefix = text(header[345:500]) if header[257:262] == b"ustar" and header[262:263] == b"\0" else ""
        if prefix and not (pax.get("path") or long_name):
            name = f"{prefix}/{name}"
        long_name, pax = None, {}
        if kind in REGULAR and not name.endswith("/"):
            yield name, start, pos, data
        start = pos


def samples_of_tars(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Pipeline stage, webdataset's `tarfile_to_samples` on this reader: dict(url=...) -> one dict
    per sample (`__key__`, `__url__` and a field per member suffix), grouped by webdataset's rule."""
    return group_by_keys(files_of_tars(url_opener(sources, handler=handler), handler), handler=handler)


def files_of_tars(streams: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Opened shards -> dict(fname, data, __url__) per member, and an empty dict after each shard
    (so no sample spans two shards); a damaged shard's error goes to `handler` after its good members."""
    for source in streams:
        url = source["url"]
        try:
            for name, data in members(source["stream"]):
                if not META.match(name):
                    yield {"fname": name, "data": data, "__url__": url}
        except Exception as exn:  # noqa: BLE001 - the handler decides: skip the shard's rest, or stop
            exn.args = (*exn.args, url)
            if not handler(exn):
                break
        finally:
            source["stream"].close()
        yield {}
