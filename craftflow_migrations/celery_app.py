"""The Celery app workers run: ``celery -A craftflow_migrations.celery_app worker -Q dagster``.

Broker and result backend come from CELERY_BROKER_URL and CELERY_BACKEND_URL, the same
variables the executor reads, so workers and runs always talk to the same queue.
"""

import os

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

app = make_app(
    {
        "broker": os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
        "backend": os.environ.get("CELERY_BACKEND_URL", "redis://127.0.0.1:6379/1"),
    }
)
app.conf.task_default_queue = "dagster"
app.conf.worker_prefetch_multiplier = 1

execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
