"""The lean tar reader against Python's tarfile and webdataset's own sample grouping."""
from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from mixer_cli.data.tar_stream import members, number, samples_of_tars


def tar_bytes(files: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT, mode: str = "w", extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def tarfile_members(raw: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


FILES = {"000000.png": b"\x89PNG" + bytes(range(256)) * 3, "000000.cls": b"7",
         "dir/000001.jpg": b"\xff\xd8" + b"x" * 511, "dir/000001.cls": b"3", "empty.txt": b""}
LONG = "a/" + "long_directory_name/" * 8 + "000002.png"  # > 100 characters: prefix, PAX or GNU long name


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfile(fmt):
    files = {**FILES, LONG: b"long", "caf\u00e9/000003.cls": b"1"}
    if fmt == tarfile.USTAR_FORMAT:
        files.pop("caf\u00e9/000003.cls")  # ustar has no way to name it
    folder, link = tarfile.TarInfo("adir"), tarfile.TarInfo("alink")
    folder.type, link.type, link.linkname = tarfile.DIRTYPE, tarfile.SYMTYPE, "000000.png"
    raw = tar_bytes(files, fmt, extra=(folder, link))
    assert list(members(io.BytesIO(raw))) == tarfile_members(raw) == list(files.items())


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_members_of_compressed_tars(mode):
    raw = tar_bytes(FILES, mode=mode)
    assert list(members(io.BytesIO(raw))) == list(FILES.items())


def test_truncated_tar_gives_the_members_before_the_damage_then_an_error():
    raw = tar_bytes(FILES)
    first = 512 + 1024  # the first member: its header, then 772 bytes of data in two blocks
    for cut, damage in ((first + 512, "unexpected end of data"), (first + 100, "truncated header")):
        names = []
        with pytest.raises(tarfile.ReadError, match=damage):
            for name, _ in members(io.BytesIO(raw[:cut])):
                names.append(name)
        assert names == ["000000.png"]


def test_a_header_with_a_bad_checksum_is_an_error():
    raw = bytearray(tar_bytes(FILES))
    raw[0] ^= 0xFF  # the first member's name: its checksum no longer holds
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(members(io.BytesIO(bytes(raw))))


def test_numbers_octal_and_base_256():
    assert number(b"0000644\0") == 0o644
    assert number(b"\0" * 8) == 0
    assert number(bytes([0x80]) + (3 * 2**40).to_bytes(11, "big")) == 3 * 2**40  # GNU, past 8 GiB


def test_samples_equal_webdatasets_tarfile_to_samples(tmp_path):
    """Grouped as webdataset groups them, metadata members left out, a damaged shard's good samples kept."""
    good = tmp_path / "a.tar"
    good.write_bytes(tar_bytes({**FILES, "__meta__": b"skip", "000004.png": b"p", "000004.cls": b"4"}))
    damaged = tmp_path / "b.tar"
    damaged.write_bytes(tar_bytes({"000005.png": b"p" * 600, "000005.cls": b"5", "000006.png": b"q" * 600})[:3172])
    urls = [dict(url=str(good)), dict(url=str(damaged))]
    errors_ours, errors_wds = [], []
    ours = list(samples_of_tars(iter([dict(u) for u in urls]), handler=lambda e: errors_ours.append(e) or True))
    theirs = list(wds.tarfile_to_samples(handler=lambda e: errors_wds.append(e) or True)(iter([dict(u) for u in urls])))
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["000000", "dir/000001", "empty", "000004", "000005"]
    assert len(errors_ours) == 1 and errors_wds  # the damage, once (webdataset's reader reports it twice)
