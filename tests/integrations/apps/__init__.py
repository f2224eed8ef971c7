"""Apps and helpers that the integration tests serve with real servers (gunicorn, uvicorn...)."""
