"""gunicorn settings for examples/gunicorn_app.py.

preload_app = True (the default here)::

    gunicorn -c examples/gunicorn_conf.py --chdir examples gunicorn_app:app

preload_app = False::

    SHMNONCE_EXAMPLE_PRELOAD=0 gunicorn -c examples/gunicorn_conf.py --chdir examples gunicorn_app:app

With preload the master imports the app, so ``ShmNonce.attach`` runs once in
the master and the workers inherit the engine across ``fork()``; shmnonce
closes the lock descriptors the worker inherited and opens the worker's own.
Without preload every worker imports the app and attaches on its own. Either
way no ``post_fork`` or ``worker_exit`` hook is required, and worker recycling
(``max_requests``), a killed worker and ``kill -HUP <master>`` keep the sequence
intact. Command-line options override these values.
"""

import os

bind = os.environ.get("SHMNONCE_EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("SHMNONCE_EXAMPLE_WORKERS", "4"))
worker_class = os.environ.get("SHMNONCE_EXAMPLE_WORKER_CLASS", "sync")  # or "gthread"
# threads > 1 would silently turn "sync" into "gthread", so set it only for gthread.
threads = int(os.environ.get("SHMNONCE_EXAMPLE_THREADS", "4")) if worker_class == "gthread" else 1
preload_app = os.environ.get("SHMNONCE_EXAMPLE_PRELOAD", "1") != "0"
max_requests = int(os.environ.get("SHMNONCE_EXAMPLE_MAX_REQUESTS", "1000"))
max_requests_jitter = int(os.environ.get("SHMNONCE_EXAMPLE_MAX_REQUESTS_JITTER", "50"))
graceful_timeout = 10
