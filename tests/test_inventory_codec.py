"""Wire format: round trips, size, and a decoder that rejects every corrupt or hostile input."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chiba_admin.errors import InventoryError
from inventory import (DIR, FILE, LINK, MAGIC, Entry, Inventory, Issue, decode_inventory,
                       encode_inventory, scan)
from inventory.codec import _HEADER, FORMAT_VERSION

T0 = 1_700_000_000_000_000_000


def F(path, size=1, digest=None, mtime=T0):
    return Entry(path, FILE, size, 0o644, mtime, None, digest)


def D(path):
    return Entry(path, DIR, 0, 0o755, T0)


def L(path, target):
    return Entry(path, LINK, len(target), 0o777, T0, target)


def raw_inv(*entries, algo=None):
    """An Inventory built without any validation, as a hostile sender could."""
    return Inventory({str(i): e for i, e in enumerate(entries)}, algo=algo)


def sample():
    entries = [D("d"), F("d/a", 10, b"a" * 32), F("d/b\udcff", 2**40, b"b" * 32, mtime=-5),
               L("d/l", "/abs/target"), D("d/sub"), F("d/sub/c", 0, b"c" * 32), F("z", 7, b"z" * 32)]
    return Inventory.from_entries(entries, errors=[Issue("x", "cannot read directory: EACCES")],
                                  skipped=[Issue("p", "fifo skipped")], root="/srv/\udce9repo",
                                  algo="blake3")


def test_round_trip_everything():
    inv = sample()
    back = decode_inventory(encode_inventory(inv))
    assert back.entries == inv.entries
    assert list(back.entries) == list(inv.entries)
    assert back.errors == inv.errors and back.skipped == inv.skipped
    assert back.root == inv.root and back.algo == "blake3"


def test_round_trip_unhashed_and_xxh3(tmp_path):
    (tmp_path / "f").write_bytes(b"data")
    os.symlink("f", tmp_path / "l")
    for kw in ({}, {"checksum": True, "algo": "xxh3_128"}):
        inv = scan(tmp_path, **kw)
        back = decode_inventory(encode_inventory(inv))
        assert back.entries == inv.entries and back.algo == inv.algo


def test_empty_inventory_round_trips():
    back = decode_inventory(encode_inventory(Inventory()))
    assert len(back) == 0 and back.algo is None


def test_100k_entries_compact_and_with_hashes():
    entries = []
    for d in range(400):
        entries.append(D(f"pkg{d:03d}"))
        for f in range(250):
            entries.append(F(f"pkg{d:03d}/lib/mod_{f:04d}.py"[:0] + f"pkg{d:03d}/file_{f:04d}.dat",
                             (d * 7919 + f * 104729) % 1_000_000, os.urandom(32),
                             T0 + (d * 250 + f) * 1_000_003))
    inv = Inventory.from_entries(entries, algo="blake3")
    assert len(inv) == 100_400
    hashed = encode_inventory(inv)
    plain = encode_inventory(Inventory.from_entries(
        [Entry(e.path, e.kind, e.size, e.mode, e.mtime_ns) for e in entries]))
    assert len(plain) < 2_000_000
    assert len(hashed) < 6_000_000
    assert decode_inventory(hashed).entries == inv.entries


def test_encoder_refuses_missing_digest_in_hashed_inventory():
    with pytest.raises(InventoryError, match="without a digest"):
        encode_inventory(Inventory.from_entries([F("a")], algo="blake3"))


@pytest.mark.parametrize("entries,msg", [
    ((F("/etc/passwd"),), "absolute path"),
    ((D("a"), F("a/../../etc")), "'.' or '..'"),
    ((F(".."),), "'.' or '..'"),
    ((D("a"), F("a/./b")), "'.' or '..'"),
    ((F(""),), "empty path"),
    ((D("a"), F("a//b")), "empty path component"),
    ((D("a"), F("a/")), "empty path component"),
    ((F("a\0b"),), "NUL"),
    ((L("l", "/etc"), F("l/passwd")), "through a symlink"),
    ((D("d"), L("d/l", "/"), D("d/l/x"), F("d/l/x/y")), "through a symlink"),
    ((F("a"), F("a")), "duplicate"),
    ((F("f"), F("f/g")), "parent is not a directory"),
    ((F("orphan/child"),), "parent directory missing"),
    ((F("a/b"), D("a")), "parent directory missing"),
    ((L("l", ""),), "symlink target"),
])
def test_decoder_rejects_hostile_paths(entries, msg):
    data = encode_inventory(raw_inv(*entries))
    with pytest.raises(InventoryError, match=msg) as ei:
        decode_inventory(data)
    assert "\n" not in str(ei.value)


def test_decoder_rejects_bad_magic_and_version():
    data = encode_inventory(sample())
    with pytest.raises(InventoryError, match="bad magic"):
        decode_inventory(b"NOTCHIBA" + data[8:])
    bad_version = data[:8] + bytes([3]) + data[9:]
    with pytest.raises(InventoryError, match="version 3") as ei:
        decode_inventory(bad_version)
    assert "upgrade" in ei.value.hint
    bad_flags = data[:9] + bytes([0]) + data[10:]  # digests claimed absent, algo says blake3
    with pytest.raises(InventoryError, match="flags"):
        decode_inventory(bad_flags)


def test_decoder_rejects_truncation_everywhere():
    data = encode_inventory(sample())
    for cut in [0, 1, 7, len(MAGIC), _HEADER.size - 1, _HEADER.size, _HEADER.size + 5,
                len(data) // 2, len(data) - 4, len(data) - 1]:
        with pytest.raises(InventoryError):
            decode_inventory(data[:cut])


def test_decoder_rejects_flipped_bytes_and_trailing_garbage():
    data = encode_inventory(sample())
    for pos in range(_HEADER.size, len(data), max(1, len(data) // 40)):
        bad = bytearray(data)
        bad[pos] ^= 0x55
        with pytest.raises(InventoryError):
            decode_inventory(bytes(bad))
    with pytest.raises(InventoryError):
        decode_inventory(data + b"junk")


def test_decoder_rejects_decompression_bomb_claims():
    data = encode_inventory(sample())
    magic, ver, flags, algo, res, _, flen = _HEADER.unpack_from(data)
    huge = _HEADER.pack(magic, ver, flags, algo, res, 1 << 40, flen) + data[_HEADER.size:]
    with pytest.raises(InventoryError, match="more than"):
        decode_inventory(huge)
    with pytest.raises(InventoryError):
        decode_inventory(data, max_decoded=10)


def test_decoder_rejects_inconsistent_body():
    import zstandard
    # A well-formed frame whose body lies about its counts.
    body = struct.pack("<IIIII", 5, 0, 0, 0, 0) + b"\0" * 8
    frame = zstandard.ZstdCompressor().compress(body)
    data = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0, 0, len(body), len(frame)) + frame
    with pytest.raises(InventoryError, match="truncated"):
        decode_inventory(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decoder_never_fails_other_than_inventory_error(data):
    good = encode_inventory(sample())
    mode = data.draw(st.sampled_from(["garbage", "mutate", "splice"]))
    if mode == "garbage":
        blob = data.draw(st.binary(max_size=300))
    elif mode == "mutate":
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    else:
        blob = good[:_HEADER.size] + data.draw(st.binary(max_size=200))
    try:
        out = decode_inventory(blob)
    except InventoryError:
        return
    assert isinstance(out, Inventory)


def test_a_frame_claiming_a_huge_content_size_is_refused_without_allocating_it():
    """Hypothesis found it: one byte of the zstd frame header changed made the content
    size it claims enormous, and the decoder asked for that much memory up front
    (MemoryError instead of InventoryError)."""
    blob = bytearray(encode_inventory(sample()))
    blob[32] = 244  # the frame header's descriptor byte (a content-size field appears)
    with pytest.raises(InventoryError):
        decode_inventory(bytes(blob))
