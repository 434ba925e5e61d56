"""The one scale check of the code base: what an upscaling factor may be.

Two rules existed (the models accepted 2 and 4, the degradations any positive number equal to an
integer, 2.0 included); now one function holds both, with ``supported`` saying which: the models
pass the factors they are built for, the degradation operators (which also crop images to a
multiple) pass None for "any positive integer". Floats are refused everywhere: a factor read as
2.0 from a config is a type error, not a scale.
"""

from __future__ import annotations

import operator

SUPPORTED_SCALES: tuple[int, ...] = (2, 4)


def check_scale(scale: object, supported: tuple[int, ...] | None = SUPPORTED_SCALES) -> int:
    """``scale`` as an int.

    Args:
        scale: an integer (numpy integers from YAML/pandas accepted; bool and float refused).
        supported: the allowed factors, or None for any positive integer.

    Raises:
        ValueError: ``scale`` is not an integer, is below 1, or is not in ``supported``; the message
            names the allowed values.
    """
    allowed = ("expected a positive integer" if supported is None
               else "supported scales: " + ", ".join(str(s) for s in supported))
    message = f"unsupported scale {scale!r}; {allowed}"
    if isinstance(scale, bool):
        raise ValueError(message)
    try:
        value = operator.index(scale)  # accepts numpy integers, rejects 2.0
    except TypeError:
        raise ValueError(message) from None
    if value < 1 or (supported is not None and value not in supported):
        raise ValueError(message)
    return value
