"""pydicom's warnings without element values.

pydicom reports a malformed element with its value (``Invalid value for VR IS: '<value>'``),
both through its ``pydicom`` logger and as a Python warning (``pydicom.misc.warn_and_log``): for
a wrong-VR PatientID, the patient's identifier in the log. :func:`scrub_pydicom_warnings` routes
both through :class:`ElementValueFilter`, which keeps the message (the VR, the tag or keyword
pydicom names) and replaces every quoted value with ``<value withheld>``.
"""

from __future__ import annotations

import logging
import re

WITHHELD = "<value withheld>"
_QUOTED = re.compile(r"""b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*\"""")
_LOGGERS = ("pydicom", "py.warnings")


def without_values(text: str) -> str:
    """``text`` with every quoted value (``'...'``, ``"..."``, ``b'...'``) withheld."""
    return _QUOTED.sub(WITHHELD, text)


class ElementValueFilter(logging.Filter):
    """Rewrites a record's message without quoted values (its arguments are formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg, record.args = without_values(message), None
        return True


def scrub_pydicom_warnings() -> None:
    """Send Python warnings to logging (``py.warnings``) and scrub it and the ``pydicom`` logger.

    Idempotent. Logger filters see only records logged on that logger, which is where pydicom
    and :func:`logging.captureWarnings` log.
    """
    logging.captureWarnings(True)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, ElementValueFilter) for existing in logger.filters):
            logger.addFilter(ElementValueFilter())
