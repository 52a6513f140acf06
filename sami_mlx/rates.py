"""Rates as people read them: two or three significant digits, however slow or fast the machine."""

from __future__ import annotations

import math


def format_rate(value: float | None, unit: str = "tok/s") -> str:
    """'0.31 tok/s', '4.7 tok/s', '12 tok/s', '9,340 tok/s': two significant digits below 100, three
    above (with thousands separators); 'n/a tok/s' for a missing or non-finite rate."""
    if value is None or not math.isfinite(value):
        return f"n/a {unit}"
    if value == 0:
        return f"0 {unit}"
    digits = 3 if abs(value) >= 100 else 2
    rounded = float(f"{value:.{digits}g}")
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:,.{decimals}f} {unit}"
