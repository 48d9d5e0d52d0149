"""Shared code of the aichat Function Compute services (deployed as a layer at /opt/python/aichat)."""
