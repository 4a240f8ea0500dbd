"""Argument checks shared by the library.

Privacy depends on these values (a clip norm of 0, a NaN noise multiplier or
a delta of 1 silently voids the guarantee), so every check raises an
exception naming the offending value, in the form "Expected delta=0.0 > 0.";
none is an `assert`, which `python -O` removes.
"""

import math
import numbers
from typing import Any
from typing import Optional


class UserError(ValueError):
    """A mistake in what the user asked for, not a bug.

    The message names the cause and the fix; command line tools print it as a
    one-line `error: ...` with exit status 2 instead of a traceback.
    """


def check_real(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless it is a finite real number.

    Raises:
      TypeError: for a non-number (or a bool).
      ValueError: for NaN or an infinity.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected {name} to be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Expected {name}={value} to be finite.")
    return value


def check_positive(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless it is finite and > 0."""
    value = check_real(name, value)
    if value <= 0:
        raise ValueError(f"Expected {name}={value} > 0.")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless it is finite and >= 0."""
    value = check_real(name, value)
    if value < 0:
        raise ValueError(f"Expected {name}={value} >= 0.")
    return value


def check_probability(name: str, value: Any) -> float:
    """Returns `value` as a float; raises unless 0 < value <= 1."""
    value = check_real(name, value)
    if not 0 < value <= 1:
        raise ValueError(f"Expected 0 < {name}={value} <= 1.")
    return value


def check_delta(delta: Any) -> float:
    """Returns delta as a float; raises unless 0 < delta < 1."""
    delta = check_positive("delta", delta)
    if delta >= 1:
        raise ValueError(f"Expected delta={delta} < 1.")
    return delta


def check_int(name: str, value: Any, minimum: int = 1,
              allow_none: bool = False) -> Optional[int]:
    """Returns `value` as an int; raises unless it is an integer >= minimum.

    NumPy integers are accepted; floats, even integral ones, are not (a
    fractional batch size or step count is a bug upstream).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected {name} to be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"Expected {name}={value} >= {minimum}.")
    return int(value)


def check_one_of(name: str, value: Any, allowed: tuple) -> Any:
    """Returns `value`; raises unless it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"Expected {name}={value!r} to be one of {allowed}.")
    return value
