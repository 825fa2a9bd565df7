"""Baseline: a bare Flask endpoint that parses the JSON body and echoes it with 201.

The ceiling of our stack (Flask under gunicorn with the same worker settings as tt-server):
no validation, geolocation, scrubbing or storage. ``gunicorn --chdir bench echo_app:app``.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/report")
def report():
    return jsonify(request.get_json()), 201


@app.get("/healthz")
def healthz():
    return jsonify({"ok": True})
