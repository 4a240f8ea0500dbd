"""Argument checks shared by the library.

Privacy depends on these values (a clip norm of 0 or a NaN noise multiplier
silently voids the guarantee), so every check raises an exception that names
the offending value; none of them is an `assert`, which `python -O` removes.
"""

import math
from typing import Any, Optional


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected {name} to be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Expected {name}={value} to be finite.")
    return value


def check_positive(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless it is finite and > 0."""
    value = _check_real(name, value)
    if value <= 0:
        raise ValueError(f"Expected {name}={value} > 0.")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless it is finite and >= 0."""
    value = _check_real(name, value)
    if value < 0:
        raise ValueError(f"Expected {name}={value} >= 0.")
    return value


def check_positive_int(name: str, value: Any,
                                              allow_none: bool = False) -> Optional[int]:
    """Returns `value` as an int; raises unless it is an integer >= 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        # Accept integral floats such as 2000.0, a common result of arithmetic.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"Expected {name} to be an integer, got {value!r}.")
    if value < 1:
        raise ValueError(f"Expected {name}={value} >= 1.")
    return value


def check_one_of(name: str, value: Any, allowed: tuple) -> Any:
    """Returns `value`; raises unless it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"Expected {name} to be one of {allowed}, got {value!r}.")
    return value
