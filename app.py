"""Serve the xray API: `python app.py` listens on 0.0.0.0:$PORT (default 8000)."""

import logging
import os

import uvicorn

from xray.api import create_app
from xray.inference import use_serving_threads
from xray.settings import Settings

use_serving_threads(Settings.from_environment())  # this process serves: torch threads set for that
app = create_app()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host="0.0.0.0", port=int(os.environ.get("PORT", "8000")), log_level="info")
