"""gunicorn settings shared by every service: multiprocess metrics, logs to stdout."""
import os
import shutil
import tempfile

# Must be set before prometheus_client is imported anywhere in this process tree: the value
# class (shared mmap files vs in-process) is chosen at import time.
_prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _prom_dir:
    shutil.rmtree(_prom_dir, ignore_errors=True)
    os.makedirs(_prom_dir, exist_ok=True)
else:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metis-prom-")

bind = os.environ.get("METIS_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("METIS_WORKERS", "2"))
threads = int(os.environ.get("METIS_THREADS", "4"))
worker_class = "gthread"
timeout = int(os.environ.get("METIS_WORKER_TIMEOUT", "120"))
graceful_timeout = 10
accesslog = None
errorlog = "-"


def child_exit(server: object, worker: object) -> None:
    """gunicorn hook: drop a dead worker's live gauges from the shared metrics directory."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(getattr(worker, "pid"))  # type: ignore[no-untyped-call]
