"""The HubSpot webhook receiver."""

from webhook.app import create_app

__all__ = ["create_app"]
