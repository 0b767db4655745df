"""The Celery app workers run: ``celery -A craftflow_migrations.celery_app worker -Q dagster``.

Broker and result backend come from CELERY_BROKER_URL and CELERY_BACKEND_URL, the same
variables the executor reads, so workers and runs always talk to the same queue.
"""

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from .settings import get_settings

_settings = get_settings()
app = make_app(
    {
        "broker": _settings.celery_broker_url.get_secret_value(),
        "backend": _settings.celery_backend_url.get_secret_value(),
    }
)
app.conf.task_default_queue = "dagster"
app.conf.worker_prefetch_multiplier = 1

execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
