"""Workers: the Celery app and tasks, the HubSpot side, and local running."""
