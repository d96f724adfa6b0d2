"""Which HubSpot credentials serve which portal.

A private-app token belongs to one portal, learned from the account details
endpoint once (and cached in Redis for a day, keyed by a hash of the token, so
every worker process does not ask again). An event from any other portal is
refused with :class:`~workers.tasks.UnknownPortal`. OAuth apps with many
installing portals would plug in here, behind the same ``credentials_for``.
"""

import hashlib

from workers.hubspot import HubSpotClient
from workers.logs import get_logger

log = get_logger(__name__)

PORTAL_CACHE_PREFIX = "associator:token-portal:"
PORTAL_CACHE_SECONDS = 24 * 3600


class UnknownPortal(Exception):
    """The event's portal is not one the service holds credentials for."""


class PrivateAppCredentials:
    def __init__(self, settings, redis):
        self.settings = settings
        self.redis = redis
        self._client: HubSpotClient | None = None
        self._portal_id: int | None = None

    @property
    def configured(self) -> bool:
        return bool(self.settings.hubspot_access_token)

    def client(self) -> HubSpotClient:
        if self._client is None:
            self._client = HubSpotClient(
                token=self.settings.hubspot_access_token,
                base_url=self.settings.hubspot_api_base_url,
                api_version=self.settings.hubspot_api_version,
                timeout=self.settings.http_timeout_seconds,
            )
        return self._client

    def token_portal(self) -> int:
        """The portal the token belongs to."""
        if self._portal_id is not None:
            return self._portal_id
        digest = hashlib.sha256(self.settings.hubspot_access_token.encode())
        key = PORTAL_CACHE_PREFIX + digest.hexdigest()[:24]
        cached = self.redis.get(key)
        if cached:
            self._portal_id = int(cached)
        else:
            details = self.client().account_details()
            self._portal_id = int(details["portalId"])
            self.redis.set(key, self._portal_id, ex=PORTAL_CACHE_SECONDS)
            log.info("token_portal_learned", portal=self._portal_id)
        return self._portal_id

    def credentials_for(self, portal_id: int) -> HubSpotClient | None:
        if not self.configured:
            return None
        token_portal = self.token_portal()
        if portal_id != token_portal:
            raise UnknownPortal(
                f"portal {portal_id} is not the access token's portal {token_portal}"
            )
        return self.client()
