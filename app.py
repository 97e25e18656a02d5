"""Serve the xray API: `python app.py` listens on $HOST:$PORT (default 0.0.0.0:8000, every interface, as a
container needs; HOST=127.0.0.1 keeps it to this machine).

`uvicorn app:app` finds the same application. A misconfiguration (a malformed XRAY_* variable,
for instance) stops `python app.py` with one sentence naming it and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from xray.api import create_app
from xray.config import ConfigError
from xray.settings import Settings


def main() -> int:
    """Read the settings, then serve until stopped; a ConfigError is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_environment()
        port = int(os.environ.get("PORT", "8000"))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: environment variable PORT={os.environ['PORT']!r} must be a whole number", file=sys.stderr)
        return 2
    host = os.environ.get("HOST", "0.0.0.0")  # noqa: S104 (a container's port must be reachable from outside it)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    app = create_app()
