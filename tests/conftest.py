"""Shared pytest configuration for every test package."""

# --- real services (moto S3, MLflow tracking server): see tests/services.py ---------------
pytest_plugins = ["tests.services"]
