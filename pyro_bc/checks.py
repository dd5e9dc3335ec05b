"""What the package's argument checks count as an integer or a number.

Python's ``bool`` is an ``int`` and numpy's integers are not, so ``isinstance(value, int)``
takes ``epochs=True`` and refuses ``epochs=np.int64(3)``; these do the opposite.

Example::

    is_integer(np.int64(3)), is_integer(True)  # (True, False)
    require_count(epochs, "fit: epochs", minimum=0)
"""

from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    """True for a Python or numpy integer, False for a bool and anything else.

    Example::

        is_integer(3), is_integer(3.0)  # (True, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """True for a real number (NaN and infinities included), False for a bool and anything else.

    Example::

        is_number(np.float32(0.04)), is_number("0.04")  # (True, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_count(value, name: str, minimum: int) -> None:
    """Raises unless ``value`` is an integer of at least ``minimum``, naming the argument.

    Example::

        require_count(num_particles, "fit: num_particles", minimum=1)
    """
    if not (is_integer(value) and value >= minimum):
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")
