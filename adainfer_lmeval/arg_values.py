"""Model-arg values as the types their readers declare, without coercion (standard library only)."""

from __future__ import annotations

import math

from adainfer_lmeval.errors import AdaInferError


def convert_arg(key: str, value, kind: type, where: str = ""):
    """``value`` (a string, or what lm-eval's arg parser made of it) as ``kind``, without coercion.

    ``int`` takes only whole numbers (``1.5`` and ``True`` are refused, ``int()`` would give 1);
    ``float`` takes only finite numbers (a NaN threshold compares false with everything).
    """
    where = f" {where}" if where else ""
    bad = AdaInferError(f"{key}={value!r} is not a valid {kind.__name__}{where}")
    if kind is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise AdaInferError(f"{key}={value!r} is not a whole number{where}")
        text = str(value).strip()
        if text.lstrip("+-").isdigit():
            return int(text)
        try:
            number = float(text)
        except ValueError:
            raise bad from None
        if number.is_integer():
            return int(number)
        raise AdaInferError(f"{key}={value!r} is not a whole number{where}")
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise AdaInferError(f"{key}={value!r} must be a finite number{where}")
        return number
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise bad from None
