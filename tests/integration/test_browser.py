"""The demo page in headless Chromium: two users chat through a drain and a crash.

Three gateways, six partitions. alice and bob are owned by two different
instances; both pages are served by the third, so the page itself never goes
away. The owner of alice is drained (SIGTERM) while both sides keep sending,
then the owner of bob is killed (SIGKILL) while both sides keep sending. Every
message must arrive exactly once, in order, and reach "delivered" on the
sender's page. Screenshots of both pages go to test-artifacts/.

Needs Debian's chromium and chromium-driver and selenium from PyPI; skips with
the reason when any is missing. LINECHAT_CHROMIUM / LINECHAT_CHROMEDRIVER
point at other binaries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from support.cluster import Cluster, ClusterNames, GatewayProcess, http_get, start_cluster

from linechatd.hashing import partition_for

PARTITIONS = 6
INSTANCES = 3
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _binary(env: str, *names: str) -> str | None:
    configured = os.environ.get(env)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _binary("LINECHAT_CHROMIUM", "chromium", "chromium-browser")
CHROMEDRIVER = _binary("LINECHAT_CHROMEDRIVER", "chromedriver")

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="headless Chromium not found (apt-get install chromium)"
    ),
    pytest.mark.skipif(
        CHROMEDRIVER is None, reason="chromedriver not found (apt-get install chromium-driver)"
    ),
]

T = TypeVar("T")

# One DOM read per poll: the connection badge and every message on the page.
_SNAPSHOT_JS = """
const badge = document.getElementById("conn");
const items = (selector) => Array.from(document.querySelectorAll(selector));
return {
  state: badge.dataset.state,
  instance: badge.dataset.instance || null,
  connections: Number(badge.dataset.connections || 0),
  text: document.getElementById("conn-text").textContent,
  out: items("li.msg.out").map((e) => [e.dataset.id, e.dataset.text, e.dataset.state]),
  in: items("li.msg.in").map((e) => [e.dataset.from, e.dataset.text, Number(e.dataset.offset)]),
  events: items("#events li").map((e) => e.textContent),
};
"""


@dataclass(frozen=True)
class Snapshot:
    state: str
    instance: str | None
    connections: int
    text: str
    out: list[tuple[str, str, str]]  # (id, text, state)
    received: list[tuple[str, str, int]]  # (from, text, offset)
    events: list[str]

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Snapshot:
        return cls(
            state=doc["state"],
            instance=doc["instance"],
            connections=doc["connections"],
            text=doc["text"],
            out=[tuple(x) for x in doc["out"]],  # type: ignore[misc]
            received=[tuple(x) for x in doc["in"]],  # type: ignore[misc]
            events=doc["events"],
        )


class Browser:
    """One headless Chromium (through chromedriver) with one tab per user.

    Blocking (selenium): the test calls it through trio.to_thread.
    """

    def __init__(self) -> None:
        from selenium.webdriver.chrome.service import Service

        self._profile = tempfile.TemporaryDirectory(prefix="linechat-chromium-")
        options = webdriver.ChromeOptions()
        assert CHROMIUM is not None and CHROMEDRIVER is not None
        options.binary_location = CHROMIUM
        for flag in (
            "--headless",
            "--no-sandbox",  # we run as root in CI
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            # No calls home: the machine has no network besides loopback.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            # Both tabs must keep their timers (backoff, pings) running at full speed.
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--window-size=1280,900",
            f"--user-data-dir={self._profile.name}",
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(20)
        self.driver.set_script_timeout(10)
        self._first_tab = True

    def open(self, url: str) -> str:
        if self._first_tab:
            self._first_tab = False
        else:
            self.driver.switch_to.new_window("tab")
        self.driver.get(url)
        handle: str = self.driver.current_window_handle
        return handle

    def snapshot(self, handle: str) -> Snapshot:
        self.driver.switch_to.window(handle)
        return Snapshot.of(self.driver.execute_script(_SNAPSHOT_JS))

    def type_message(self, handle: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.switch_to.window(handle)
        self.driver.find_element(By.ID, "text").send_keys(text + "\n")

    def screenshot(self, handle: str, path: Path) -> None:
        self.driver.switch_to.window(handle)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))

    def tabs(self) -> list[str]:
        handles: list[str] = self.driver.window_handles
        return handles

    def console(self) -> list[str]:
        try:
            return [str(entry) for entry in self.driver.get_log("browser")]
        except Exception:  # not every driver keeps a log
            return []

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            self._profile.cleanup()


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    # Abandoned on cancel: a wedged browser must not keep the test's deadline from firing.
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


async def wait_balanced(cluster: Cluster) -> dict[int, str]:
    """partition -> owner, once every instance owns its fair share (2 of 6)."""
    while True:
        _status, _headers, doc = await http_get(cluster[0].http_url + "/api/partitions")
        owners = {p["partition"]: p["instance"] for p in doc["partitions"]}
        counts = {g.instance_id: 0 for g in cluster.instances}
        for owner in owners.values():
            if owner in counts:
                counts[owner] += 1
        if set(counts.values()) == {PARTITIONS // INSTANCES}:
            return owners
        await trio.sleep(0.1)


def candidates(name: str) -> Iterator[str]:
    yield name
    for n in range(2, 200):
        yield f"{name}{n}"


def pick_users(owners: Mapping[int, str]) -> tuple[str, str]:
    """alice and bob (or the first variants of them) owned by different instances."""
    alice = "alice"
    for bob in candidates("bob"):
        if owners[partition_for(bob, PARTITIONS)] != owners[partition_for(alice, PARTITIONS)]:
            return alice, bob
    raise AssertionError("no bob variant on another instance")


@dataclass
class User:
    uid: str
    tab: str
    sent: list[str]


async def wait_for(
    browser: Browser,
    user: User,
    what: str,
    check: Callable[[Snapshot], bool],
    timeout: float = 60.0,  # noqa: ASYNC109 - a deadline of our own, to report the page
) -> Snapshot:
    """Poll the page until ``check`` holds; on timeout, fail with what the page shows."""
    started = trio.current_time()
    snap: Snapshot | None = None
    with trio.move_on_after(timeout):
        while True:
            snap = await blocking(browser.snapshot, user.tab)
            if check(snap):
                print(f"{user.uid}: {what} after {trio.current_time() - started:.2f} s")
                return snap
            assert snap.state != "closed", f"{user.uid}'s page closed: {snap.text}"
            failed = [m for m in snap.out if m[2] == "failed"]
            assert not failed, f"{user.uid}'s sends failed: {failed}; events: {snap.events}"
            await trio.sleep(0.1)
    raise AssertionError(f"{user.uid}: not {what} within {timeout:g} s; the page shows {snap}")


async def say(browser: Browser, user: User, text: str) -> None:
    await blocking(browser.type_message, user.tab, text)
    user.sent.append(text)


def everything_arrived(me: User, peer: User) -> Callable[[Snapshot], bool]:
    """Every text ``peer`` sent is on my page, and every text I sent is delivered."""

    def check(snap: Snapshot) -> bool:
        received = [text for sender, text, _offset in snap.received if sender == peer.uid]
        delivered = [text for _id, text, state in snap.out if state == "delivered"]
        return len(received) >= len(peer.sent) and len(delivered) == len(me.sent)

    return check


def assert_exactly_once_in_order(me: User, peer: User, snap: Snapshot) -> None:
    received = [text for sender, text, _offset in snap.received if sender == peer.uid]
    assert received == peer.sent, f"{me.uid} got {received}, {peer.uid} sent {peer.sent}"
    offsets = [offset for _sender, _text, offset in snap.received]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert [text for _id, text, _state in snap.out] == me.sent
    assert all(state == "delivered" for _id, _text, state in snap.out), snap.out


async def exchange_until_delivered(browser: Browser, alice: User, bob: User, what: str) -> None:
    await wait_for(browser, alice, f"{what}: all in", everything_arrived(alice, bob))
    await wait_for(browser, bob, f"{what}: all in", everything_arrived(bob, alice))


async def test_demo_pages_chat_through_a_drain_and_a_kill(
    tmp_path: Path, zookeeper_hosts: str, kafka_bootstrap: str, cluster_names: ClusterNames
) -> None:
    with trio.fail_after(240):
        async with start_cluster(
            INSTANCES,
            workdir=tmp_path,
            zookeeper_hosts=zookeeper_hosts,
            kafka_bootstrap=kafka_bootstrap,
            names=cluster_names,
            partitions=PARTITIONS,
            sections={
                "http": {"demo_page": True},
                # A short session: the killed instance's partitions move on quickly.
                "zookeeper": {"session_timeout": 3.0},
            },
        ) as cluster:
            owners = await wait_balanced(cluster)
            alice_uid, bob_uid = pick_users(owners)
            alice_owner = cluster.by_id(owners[partition_for(alice_uid, PARTITIONS)])
            bob_owner = cluster.by_id(owners[partition_for(bob_uid, PARTITIONS)])
            [host] = [g for g in cluster.instances if g not in (alice_owner, bob_owner)]
            print(
                f"alice={alice_uid} on {alice_owner.instance_id}, bob={bob_uid} on "
                f"{bob_owner.instance_id}, pages from {host.instance_id}"
            )

            browser = await blocking(Browser)
            try:
                await _scenario(browser, host, alice_owner, bob_owner, alice_uid, bob_uid)
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    for user_tab in await blocking(browser.tabs):
                        print("page:", await blocking(browser.snapshot, user_tab))
                    print("browser console:", *await blocking(browser.console), sep="\n  ")
                raise
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(15):
                    await blocking(browser.quit)


async def _scenario(
    browser: Browser,
    host: GatewayProcess,
    alice_owner: GatewayProcess,
    bob_owner: GatewayProcess,
    alice_uid: str,
    bob_uid: str,
) -> None:
    alice = User(
        alice_uid,
        await blocking(browser.open, f"{host.http_url}/?uid={alice_uid}&to={bob_uid}"),
        [],
    )
    bob = User(
        bob_uid, await blocking(browser.open, f"{host.http_url}/?uid={bob_uid}&to={alice_uid}"), []
    )
    for user, owner in ((alice, alice_owner), (bob, bob_owner)):
        snap = await wait_for(browser, user, "connected", lambda s: s.state == "connected")
        assert snap.instance == owner.instance_id, snap.text

    # Both ways, before anything fails.
    for i in range(3):
        await say(browser, alice, f"alice {i}")
        await say(browser, bob, f"bob {i}")
    await exchange_until_delivered(browser, alice, bob, "before the drain")

    # Drain alice's owner and keep talking through it: bob's messages go to a
    # partition being handed over; alice's go out on a socket about to close.
    alice_owner.terminate()
    for i in range(4):
        await say(browser, bob, f"bob during drain {i}")
        await say(browser, alice, f"alice during drain {i}")
    moved = await wait_for(
        browser,
        alice,
        "reconnected after the drain",
        lambda s: s.state == "connected" and s.instance != alice_owner.instance_id,
    )
    assert moved.connections >= 2
    for i in range(2):
        await say(browser, alice, f"alice after drain {i}")
        await say(browser, bob, f"bob after drain {i}")
    await exchange_until_delivered(browser, alice, bob, "after the drain")
    assert await alice_owner.wait_exit(30.0) == 0, alice_owner.log_tail()

    # Crash bob's owner: no 1012, the socket just dies; sends queue up until
    # the partition has a new owner and the page is back.
    bob_owner.kill()
    for i in range(3):
        await say(browser, bob, f"bob after kill {i}")
        await say(browser, alice, f"alice after kill {i}")
    await wait_for(
        browser,
        bob,
        "reconnected after the kill",
        lambda s: s.state == "connected" and s.instance == host.instance_id,
    )
    await exchange_until_delivered(browser, alice, bob, "after the kill")

    alice_final = await blocking(browser.snapshot, alice.tab)
    bob_final = await blocking(browser.snapshot, bob.tab)
    assert_exactly_once_in_order(alice, bob, alice_final)
    assert_exactly_once_in_order(bob, alice, bob_final)
    print(f"alice: {alice_final.connections} connections; events: {alice_final.events}")
    print(f"bob: {bob_final.connections} connections; events: {bob_final.events}")
    await blocking(browser.screenshot, alice.tab, ARTIFACTS / "browser-alice.png")
    await blocking(browser.screenshot, bob.tab, ARTIFACTS / "browser-bob.png")
