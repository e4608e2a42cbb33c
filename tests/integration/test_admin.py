"""Admin endpoints trust no address (CONTRACT §4): a token on every request, 404 without one
configured, 401 for a wrong one, 403 with an Origin; the admin listener serves them alone."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from support.cluster import ClusterNames, http_get, start_cluster

from linechatd.localservices import free_ports

TOKEN = "admin-endpoint-test-token-0123456789abcdef"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post_blocking(url: str, headers: Mapping[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"", headers=dict(headers), method="POST")
    try:
        response = _OPENER.open(request, timeout=10)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        return response.status, json.loads(response.read() or b"null")


async def post(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(_post_blocking, url, headers or {})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_token_configured_admin_is_404_even_from_loopback(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=2,
    ) as cluster:
        gateway = cluster[0]
        with trio.fail_after(30):
            assert await post(gateway.http_url + "/admin/drain") == (404, {"error": "not_found"})
            assert await post(gateway.http_url + "/admin/drain", bearer(TOKEN)) == (
                404,
                {"error": "not_found"},
            )
            status, _, _ = await http_get(gateway.http_url + "/readyz")
        assert status == 200 and gateway.is_running()


async def test_the_token_is_required_and_pages_are_refused(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(f"  {TOKEN}\n")
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=2,
        sections={"admin": {"token_file": str(token_file)}},
    ) as cluster:
        gateway = cluster[0]
        drain = gateway.http_url + "/admin/drain"
        with trio.fail_after(30):
            assert await post(drain) == (401, {"error": "unauthorized"})
            assert await post(drain, bearer(TOKEN + "x")) == (401, {"error": "unauthorized"})
            assert await post(drain, {"Authorization": TOKEN}) == (401, {"error": "unauthorized"})
            # A page in a browser on this very host, even one that knows the token.
            assert await post(drain, {**bearer(TOKEN), "Origin": "http://127.0.0.1:1"}) == (
                403,
                {"error": "forbidden_origin"},
            )
            # Meant for another instance: refused, nothing happens.
            assert await post(drain + "?instance=gw-other", bearer(TOKEN)) == (
                409,
                {"error": "wrong_instance", "instance": "gw-0"},
            )
            status, _, _ = await http_get(gateway.http_url + "/readyz")
            assert status == 200 and gateway.is_running()
            assert await post(drain + "?instance=gw-0", bearer(TOKEN)) == (
                202,
                {"draining": True, "instance": "gw-0"},
            )
            assert await gateway.wait_exit(30) == 0


async def test_an_admin_listener_serves_admin_alone(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN)
    (admin_port,) = free_ports(1)
    admin_url = f"http://127.0.0.1:{admin_port}"
    async with start_cluster(
        1,
        workdir=tmp_path,
        zookeeper_hosts=zookeeper_hosts,
        kafka_bootstrap=kafka_bootstrap,
        names=cluster_names,
        partitions=2,
        sections={"admin": {"token_file": str(token_file), "listen": f"127.0.0.1:{admin_port}"}},
    ) as cluster:
        gateway = cluster[0]
        with trio.fail_after(30):
            # The HTTP listener no longer has the admin endpoints at all.
            assert await post(gateway.http_url + "/admin/drain", bearer(TOKEN)) == (
                404,
                {"error": "not_found"},
            )
            status, _, body = await http_get(admin_url + "/metrics")
            assert status == 200 and "linechatd_build_info" in body
            status, _, doc = await http_get(admin_url + "/api/status")
            assert status == 200 and doc["instance"] == "gw-0"
            status, _, _ = await http_get(admin_url + "/api/connection-url?uid=alice")
            assert status == 404
            status, _, _ = await http_get(admin_url + "/readyz")
            assert status == 200
            assert await post(admin_url + "/admin/drain") == (401, {"error": "unauthorized"})
            assert await post(admin_url + "/admin/drain", bearer(TOKEN)) == (
                202,
                {"draining": True, "instance": "gw-0"},
            )
            assert await gateway.wait_exit(30) == 0
