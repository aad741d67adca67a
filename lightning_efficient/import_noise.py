"""Known-harmless log lines that our dependencies print while ``lightning_efficient`` is imported.

Importing ``transformers`` imports torchao, which logs one "Failed to load ..." line per optional
CUDA kernel library it cannot load (the mxfp8 and SM90 cutlass kernels, which this package never
uses), and registers two enums with torch's pytree, which logs a deprecation line for each. They
reach every user's first screen and no user can act on them. :func:`hide_import_noise` drops
exactly those records, by logger and message, before the package imports its dependencies; every
other record of those loggers, and every other logger, is left alone. It uses the standard library
only, so ``lightning_efficient/__init__.py`` can call it first.

Examples:
    >>> import logging
    >>> hide_import_noise()
    >>> any(isinstance(f, DropMatching) for f in logging.getLogger("torchao").filters)
    True
"""

from __future__ import annotations

import logging
import re

__all__ = ["HARMLESS_LOG_LINES", "DropMatching", "hide_import_noise", "hide_log_lines"]

#: (logger name, message regex) of each known-harmless line.
HARMLESS_LOG_LINES = (
    ("torchao", r"Failed to load \S*torchao/_C\w*[\w.-]*\.so: "),
    ("torch.utils._pytree", r"<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass"),
)


class DropMatching(logging.Filter):
    """A logging filter that drops the records whose message matches ``pattern`` from its start.

    Examples:
        >>> record = logging.LogRecord("torchao", logging.WARNING, __file__, 1, "Failed to load x", None, None)
        >>> DropMatching(r"Failed to load").filter(record), DropMatching(r"other").filter(record)
        (False, True)
    """

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def hide_import_noise() -> None:
    """Drop :data:`HARMLESS_LOG_LINES` from their loggers (calling it again adds nothing)."""
    hide_log_lines(HARMLESS_LOG_LINES)


def hide_log_lines(lines: tuple[tuple[str, str], ...]) -> None:
    """Drop the records of each ``(logger name, message regex)`` of ``lines`` (calling it again adds nothing)."""
    for name, message in lines:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(DropMatching(message))
