"""The store contract on a testcontainers NATS container (opt-in: LEDGER_TEST_DOCKER=1)."""

from __future__ import annotations

import pytest
from store_contract import StoreContract

from ledger.settings import Settings

pytestmark = pytest.mark.docker


class TestStoreOnAContainer(StoreContract):
    @pytest.fixture
    def settings(self, nats_container: str) -> Settings:
        return Settings(nats_url=nats_container)
