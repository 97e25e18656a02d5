"""Log setup shared by the entry points: our lines at INFO, libraries' chatter at WARNING, no library tracebacks."""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "matplotlib", "PIL")
# A logger's filters see only its own records, not its children's: pydicom's decoders log under their module name.
TRACEBACK_FREE_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base")


class WithoutTraceback(logging.Filter):
    """Keep a library's error line, drop its traceback: pydicom logs 12 lines for every undecodable upload."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__})", ()
            record.exc_info, record.exc_text = None, None
        return True


def quiet_libraries() -> None:
    """Libraries log warnings and errors only, and pydicom's errors without a traceback (a client can send many)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in TRACEBACK_FREE_LOGGERS:
        library = logging.getLogger(name)
        if not any(isinstance(existing, WithoutTraceback) for existing in library.filters):
            library.addFilter(WithoutTraceback())
