"""Parse and format bandwidths (bits/s), latencies (s) and byte sizes."""

from __future__ import annotations

import math
import re

__all__ = ["parse_bandwidth", "parse_latency", "parse_size", "format_bandwidth",
           "format_bytes"]

_RATE = {"": 1, "bit": 1, "bps": 1, "k": 1e3, "kbit": 1e3, "kbps": 1e3, "m": 1e6,
         "mbit": 1e6, "mbps": 1e6, "g": 1e9, "gbit": 1e9, "gbps": 1e9, "t": 1e12,
         "tbit": 1e12}
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
         "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4,
         "tib": 1024**4, "tb": 1000**4}


def _parse(value, table: dict, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a string, not {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([a-zA-Zµ]*)\s*", value)
        if not m or m.group(2).lower() not in table:
            raise ValueError(f"cannot parse {what} {value!r}")
        n = float(m.group(1)) * table[m.group(2).lower()]
    else:
        raise ValueError(f"{what} must be a number or a string, not {value!r}")
    if not n > 0 and what != "latency":
        raise ValueError(f"{what} must be positive, got {value!r}")
    if n < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return n


def parse_bandwidth(value) -> float:
    """``"100Mbit"``, ``"1Gbit"``, ``1e8`` -> bits per second (positive)."""
    return _parse(value, _RATE, "bandwidth")


def parse_latency(value) -> float:
    """``"0.1ms"``, ``"50us"``, ``0.001`` -> seconds (not negative)."""
    return _parse(value, _TIME, "latency")


def parse_size(value) -> int:
    """``"4MiB"``, ``"64M"``, ``1048576`` -> bytes (positive)."""
    return int(_parse(value, _SIZE, "size"))


def _sig3(x: float) -> str:
    """``x`` with 3 significant digits, no exponent, no trailing zeros (``48.9``, ``100``)."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    text = f"{x:.{digits}f}"
    if float(text) >= 1000 and digits == 0:  # 999.6 rounds to 1000: keep 4 digits, no dot
        return text
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_bandwidth(bps: float) -> str:
    """A rate in bits per second with SI prefixes and 3 significant digits.

    ``48888888.9`` -> ``"48.9 Mbit/s"``; ``1.04709e9`` -> ``"1.05 Gbit/s"``. Rates are
    always bit/s (the unit links are sold in); sizes are always IEC bytes
    (:func:`format_bytes`), in every table and progress bar.
    """
    for unit, f in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if abs(bps) >= f * 0.9995:
            return f"{_sig3(bps / f)} {unit}"
    return f"{_sig3(bps)} bit/s"


def format_bytes(n: float) -> str:
    """A size in bytes with IEC prefixes and 3 significant digits.

    ``14_784_921`` -> ``"14.1 MiB"``; ``1023`` -> ``"1023 B"`` below 1 KiB (whole bytes);
    a value that would print as 1000 or more of a unit moves to the next (``"0.98 GiB"``).
    """
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit, f in (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3), ("TiB", 1024**4)):
        v = n / f
        if abs(v) < 999.5 or unit == "TiB":
            return f"{_sig3(v)} {unit}"
    raise AssertionError("unreachable")
