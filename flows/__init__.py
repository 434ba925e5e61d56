"""Prefect flows over the DVC pipeline: ``medsr_pipeline`` (flows/pipeline.py), ``retrain``
(flows/retrain.py) and its cron deployment (flows/deploy.py, prefect.yaml)."""
