"""Units in every table and progress bar: IEC sizes, bit/s rates, 3 significant digits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chiba_admin.console import BytesColumn, RateColumn
from topology.units import format_bandwidth, format_bytes


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
    (1000 * 1024, "0.977 MiB"), (14_784_921, "14.1 MiB"), (64 * 2**20, "64 MiB"),
    (1.05 * 2**30, "1.05 GiB"), (3 * 2**40, "3 TiB"), (123_456_789, "118 MiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("bps,text", [
    (0, "0 bit/s"), (950, "950 bit/s"), (1000, "1 kbit/s"), (48_888_888.9, "48.9 Mbit/s"),
    (1.04709e9, "1.05 Gbit/s"), (1e8, "100 Mbit/s"), (19_123_456, "19.1 Mbit/s"),
])
def test_format_bandwidth(bps, text):
    assert format_bandwidth(bps) == text


@pytest.mark.parametrize("x", [0.0123456, 1.23456, 12.3456, 123.456, 999.4, 1.0, 2.5e5, 7.77e7])
def test_at_most_three_significant_digits(x):
    for text in (format_bytes(x * 1024), format_bandwidth(x * 1e6)):
        number = text.split()[0]
        assert len(number.replace(".", "").lstrip("0")) <= 3, text
        assert "e" not in number


def test_progress_columns_use_the_table_units():
    task = SimpleNamespace(completed=1.5 * 2**20, total=64 * 2**20, speed=2.5e6,
                           finished_speed=None)
    assert BytesColumn().render(task).plain == "1.5 MiB / 64 MiB"
    assert RateColumn().render(task).plain == "20 Mbit/s"
    assert BytesColumn().render(SimpleNamespace(completed=0, total=None)).plain == "0 B / ?"
