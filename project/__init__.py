# Celery's Django layout imports the Celery app here, so that every process has it. Web
# processes need it only when they send a task: INITPIPELINE["CELERY_APP"] (settings.py)
# has initpipeline import it then, and workers load it with `celery -A project`, which
# finds project/celery.py. A web process then starts without importing Celery at all.
