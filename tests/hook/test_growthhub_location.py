"""
A hook's location comes from the sync config when it is given one; the connection may not contradict it.

The location keys the rate limiter and the coordination state: a connection naming another
location would throttle this location's traffic under the other's limits.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest
from scripted_http import ScriptedApi, json_reply

from growthhub_provider.client import GrowthHubConfigError, LocalCoordination
from growthhub_provider.client.redis_coordination import RedisCoordination
from growthhub_provider.hooks.growthhub import GrowthHubHook

if TYPE_CHECKING:
    from collections.abc import Callable

MISMATCH = (
    "Connection 'growthhub_default': extra location_id='locB' differs from the location 'locA' "
    "the sync config uses it for; remove the extra or make it 'locA'"
)


class TestGrowthHubHookLocation:
    @pytest.mark.parametrize(
        ("extra", "given", "expected"),
        [("locA", "locA", "locA"), ("", "locA", "locA"), ("locB", None, "locB")],
        ids=["agreeing", "only-config", "only-extra"],
    )
    def test_location_is_the_sync_configs_else_the_connections(
        self,
        scripted_conn: Callable[..., None],
        scripted_api: ScriptedApi,
        extra: str,
        given: str | None,
        expected: str,
    ) -> None:
        scripted_conn(location_id=extra)
        hook = GrowthHubHook(location_id=given)
        scripted_api.post("/contacts/upsert", json_reply(200, {"new": True, "contact": {"id": "c1"}}))
        hook.upsert_contact({"email": "a@b.co"})
        assert scripted_api.last_request.json()["locationId"] == expected
        assert hook.location_id == hook.client.location_id == expected
        coordination = hook.coordination
        assert isinstance(coordination, LocalCoordination)
        assert coordination.location_id == expected

    @pytest.mark.parametrize("resolve", ["config", "coordination", "client", "limiter"])
    def test_a_connection_naming_another_location_is_refused(
        self, scripted_conn: Callable[..., None], scripted_api: ScriptedApi, resolve: str
    ) -> None:
        scripted_conn(location_id="locB")
        hook = GrowthHubHook(location_id="locA")
        with pytest.raises(GrowthHubConfigError) as raised:
            getattr(hook, resolve)
        assert str(raised.value) == MISMATCH
        assert hook.test_connection() == (False, MISMATCH)
        assert scripted_api.call_count == 0

    def test_a_prefixed_form_field_naming_another_location_is_refused(
        self, growthhub_conn: Callable[..., None]
    ) -> None:
        growthhub_conn(location_id="", extra__growthhub__location_id="locB")
        with pytest.raises(GrowthHubConfigError, match="extra location_id='locB' differs"):
            GrowthHubHook(location_id="locA").upsert_contact({"email": "a@b.co"})

    def test_local_limiter_is_keyed_on_the_sync_configs_location(
        self, growthhub_conn: Callable[..., None]
    ) -> None:
        growthhub_conn(location_id="")
        growthhub_conn(conn_id="growthhub_other", location_id="")
        serving_a = GrowthHubHook(location_id="locA").limiter
        assert GrowthHubHook("growthhub_other", location_id="locA").limiter is serving_a
        assert GrowthHubHook(location_id="locB").limiter is not serving_a

    def test_redis_keys_are_the_sync_configs_location(
        self, growthhub_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "AIRFLOW_CONN_SHARED_STATE",
            json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": 6379, "extra": {"db": 9}}),
        )
        growthhub_conn(location_id="", coordination="shared_state")
        coordination = GrowthHubHook(location_id="locA").coordination
        assert isinstance(coordination, RedisCoordination)
        assert coordination.key_base == "growthhub:{http://growthhub.test|locA}"
