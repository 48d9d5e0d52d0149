"""Gunicorn settings shared by FC and `make run`: `gunicorn -c python:aichat.gunicorn_conf app:app`."""

import os

# FC's custom runtime sends traffic to this port (customRuntimeConfig.port); make run binds loopback.
bind = os.environ.get("AICHAT_BIND") or f"0.0.0.0:{os.environ.get('FC_SERVER_PORT', '9000')}"
worker_class = "aichat.gunicorn_worker.Worker"
# Requests mostly wait on the upstream model or the database, so threads (not processes) carry concurrency.
workers = int(os.environ.get("AICHAT_WORKERS", "1"))
threads = int(os.environ.get("AICHAT_THREADS", "32"))
# gthread heartbeats from its main loop, so long streams do not trip this; FC's function timeout bounds them.
timeout = 120
graceful_timeout = 20
keepalive = 75
# Load the app before forking so a bad configuration stops the server at once instead of looping workers.
preload_app = True
accesslog = None
errorlog = "-"
loglevel = os.environ.get("AICHAT_LOG_LEVEL", "info").lower()
# gunicorn >= 24 opens a control socket under $HOME: FC's file system is read-only there, and two local
# services would fight over one path. Nothing here uses it.
control_socket_disable = True
