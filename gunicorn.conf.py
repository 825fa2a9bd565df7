"""Gunicorn settings for `gunicorn app:app` (the Procfile): the same as tt-server's.

Reads the same environment variables and config file; PORT (Heroku) sets the port.
"""

from tunnel_telemetry.config import load_config
from tunnel_telemetry.server import gunicorn_options

globals().update(gunicorn_options(load_config()))
