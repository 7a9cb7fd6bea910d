"""`outrigger iptables` in network namespaces: the kernel redirects what the rules say, no more.

Two pods (tests/e2e/netns.py): the client pod's app calls the server pod's app by its IP, with
no proxy settings. In the pods with rules, `relay` (tests/e2e/pod_programs.py) stands in for
the sidecar as uid 1337: it reads each connection's original destination and relays the bytes
there (no sidecar wiring yet). The relay prints one JSON record per connection it handled, so a
test can say what went through it, and (with a marker connection made last) what did not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.e2e.netns import PYTHON, Pod, PodProcess, require_root, two_pods

pytestmark = pytest.mark.root

OUTRIGGER = [PYTHON, "-m", "outrigger.cli"]
PROGRAMS = [PYTHON, "-m", "tests.e2e.pod_programs"]
SIDECAR_PORTS = "15000,15001,15006,15021,15090"  # what the injector passes
PROXY_UID = 1337


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[Pod, Pod]]:
    require_root()
    with two_pods(tmp_path) as pair:
        yield pair


def intercept(pod: Pod, *flags: str) -> str:
    """Install the rules as the init container does; what the command printed."""
    return pod.run(
        [*OUTRIGGER, "iptables", "--proxy-uid", str(PROXY_UID),
         "--exclude-inbound-ports", SIDECAR_PORTS, *flags]
    ).stdout  # fmt: skip


def listening(lines: list[dict[str, Any]]) -> bool:
    return any("listening" in line for line in lines)


def start_app(pod: Pod, program: str, port: int, *extra: str) -> PodProcess:
    app = pod.start(program, [*PROGRAMS, program, "--port", str(port), *extra])
    app.wait_for(listening, "listened")
    return app


def start_relay(pod: Pod) -> PodProcess:
    relay = pod.start("relay", [*PROGRAMS, "relay"], uid=PROXY_UID)
    relay.wait_for(listening, "listened")
    return relay


def call(pod: Pod, host: str, port: int, *extra: str, uid: int | None = None) -> dict[str, Any]:
    """The client app's connection; what it got back (an `error` key when it failed)."""
    done = pod.python("-m", "tests.e2e.pod_programs", "client", host, str(port), *extra,
                      uid=uid, check=False)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"client printed nothing: {done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def records(relay: PodProcess, count: int) -> list[dict[str, Any]]:
    """The relay's connection records, once there are `count` of them."""
    lines = relay.wait_for(
        lambda lines: len([line for line in lines if "upstream" in line]) >= count,
        f"recorded {count} connection(s)",
    )
    return [line for line in lines if "upstream" in line]


def test_outbound_connections_reach_15001_with_their_original_destination(
    pods: tuple[Pod, Pod],
) -> None:
    client, server = pods
    start_app(server, "echo", 8080)
    relay = start_relay(client)
    intercept(client)

    assert call(client, server.ip, 8080, "--send", "over ipv4")["reply"] == "over ipv4<eof>"
    assert call(client, server.ip6, 8080, "--send", "over ipv6")["reply"] == "over ipv6<eof>"

    v4, v6 = records(relay, 2)
    assert (v4["direction"], v4["upstream"]) == ("outbound", "10.0.0.2:8080")
    assert (v6["direction"], v6["upstream"]) == ("outbound", "[fd00::2]:8080")
    # bytes counted as they went: the request, then the echo with its <eof>
    assert (v4["bytes_received"], v4["bytes_sent"]) == (9, 14)
    # the relay's own connection (uid 1337) went straight out: had it been redirected, the
    # relay would have seen it too, and again, and again
    assert len(records(relay, 2)) == 2


def test_inbound_connections_reach_15006_with_the_pod_ip_as_original_destination(
    pods: tuple[Pod, Pod],
) -> None:
    client, server = pods
    app = start_app(server, "echo", 8080)
    relay = start_relay(server)
    intercept(server)

    result = call(client, server.ip, 8080, "--send", "inbound")
    assert result["reply"] == "inbound<eof>"
    [record] = records(relay, 1)
    assert record["direction"] == "inbound"
    assert record["upstream"] == "10.0.0.2:8080"  # the pod's own IP and port
    assert record["downstream"] == result["local"]  # the client's address, as it knows it
    # the app was reached by the relay from inside the pod, over lo, without a loop
    accepted = [line for line in app.json_lines() if "accepted" in line]
    assert [line["local"] for line in accepted] == ["10.0.0.2:8080"]


def test_both_pods_intercepted_a_call_goes_through_both_sidecars(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(server, "echo", 8080)
    client_relay, server_relay = start_relay(client), start_relay(server)
    intercept(client)
    intercept(server)

    assert call(client, server.ip, 8080, "--send", "both")["reply"] == "both<eof>"
    [outbound] = records(client_relay, 1)
    [inbound] = records(server_relay, 1)
    assert outbound["upstream"] == inbound["upstream"] == "10.0.0.2:8080"
    assert outbound["direction"] == "outbound" and inbound["direction"] == "inbound"


def test_the_sidecars_own_connections_are_not_redirected(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(server, "echo", 8080)
    relay = start_relay(client)
    intercept(client)

    own = call(client, server.ip, 8080, "--send", "as 1337", uid=PROXY_UID)
    assert own["reply"] == "as 1337<eof>"
    marker = call(client, server.ip, 8080, "--send", "marker")  # the app's: redirected
    assert marker["reply"] == "marker<eof>"
    [record] = records(relay, 1)
    assert record["bytes_received"] == len("marker")


def test_loopback_and_the_pods_own_ip_stay_in_the_pod(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(client, "echo", 8080)  # an app talking to itself
    start_app(server, "echo", 8080)
    relay = start_relay(client)
    intercept(client)

    for host in ("127.0.0.1", "::1", client.ip, client.ip6):
        assert call(client, host, 8080, "--send", "self")["reply"] == "self<eof>", host
    assert call(client, server.ip, 8080, "--send", "marker")["reply"] == "marker<eof>"
    [record] = records(relay, 1)
    assert record["bytes_received"] == len("marker")


def test_excluded_ports_and_cidrs_bypass_the_sidecar(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(server, "echo", 8080)
    start_app(server, "echo", 9090)
    relay = start_relay(client)
    intercept(client, "--exclude-outbound-ports", "9090", "--exclude-outbound-cidrs", "fd00::2")
    inbound_relay = start_relay(server)
    intercept(server, "--exclude-inbound-ports", f"{SIDECAR_PORTS},9090")

    assert call(client, server.ip, 9090, "--send", "port")["reply"] == "port<eof>"
    assert call(client, server.ip6, 8080, "--send", "cidr")["reply"] == "cidr<eof>"
    assert call(client, server.ip, 8080, "--send", "marker")["reply"] == "marker<eof>"
    [record] = records(relay, 1)
    assert record["bytes_received"] == len("marker")
    # on the server side, 9090 was excluded inbound: only the two calls to 8080 arrived
    inbound = records(inbound_relay, 2)
    assert sorted(r["bytes_received"] for r in inbound) == [len("cidr"), len("marker")]


def test_cleanup_restores_direct_traffic(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(server, "echo", 8080)
    intercept(client)  # no relay: a redirected connection finds nobody on 15001
    assert "ConnectionRefusedError" in call(client, server.ip, 8080)["error"]

    client.run([*OUTRIGGER, "iptables", "--cleanup"])
    assert call(client, server.ip, 8080, "--send", "direct")["reply"] == "direct<eof>"
    for family in (4, 6):
        assert "OUTRIGGER" not in client.iptables_save(family)
    again = client.run([*OUTRIGGER, "iptables", "--cleanup"]).stdout
    assert "no Outrigger rules to remove" in again


def test_running_twice_gives_the_same_rules(pods: tuple[Pod, Pod]) -> None:
    client, _ = pods
    flags = ("--exclude-outbound-ports", "3306", "--exclude-outbound-cidrs", "169.254.0.0/16")
    intercept(client, *flags)
    first = {family: rules_of(client.iptables_save(family)) for family in (4, 6)}
    second_output = intercept(client, *flags)
    second = {family: rules_of(client.iptables_save(family)) for family in (4, 6)}

    assert first == second
    assert "-D OUTPUT -p tcp -j OUTRIGGER_OUTPUT" in second_output  # it found its own jumps
    for family in (4, 6):
        assert second[family].count("-A OUTPUT -p tcp -j OUTRIGGER_OUTPUT") == 1
        assert second[family].count("-A PREROUTING -p tcp -j OUTRIGGER_INBOUND") == 1
    assert "-A OUTRIGGER_OUTPUT -d 169.254.0.0/16 -j RETURN" in first[4]
    assert "169.254.0.0/16" not in "\n".join(first[6])


def rules_of(saved: str) -> list[str]:
    """iptables-save without its comments and packet counters."""
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in saved.splitlines() if line[:1] != "#"]


def test_tls_passes_through_untouched_and_its_server_name_is_read(
    pods: tuple[Pod, Pod], tmp_path: Path
) -> None:
    client, server = pods
    ca = trustme.CA()
    cert = ca.issue_cert("payments.example")
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    for pem in cert.cert_chain_pems:
        pem.write_to_path(tmp_path / "server.pem", append=True)
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    start_app(server, "tls-echo", 8443, "--cert-dir", str(tmp_path))
    relay = start_relay(client)
    intercept(client)

    result = call(client, server.ip, 8443, "--send", "secret\n", "--tls-ca",
                  str(tmp_path / "ca.pem"), "--sni", "payments.example")  # fmt: skip
    assert result.get("reply") == "tls:secret\n", result  # the certificate verified end to end
    [record] = records(relay, 1)
    assert (record["protocol"], record["sni"]) == ("tls", "payments.example")


def test_a_server_that_speaks_first_works_through_the_sidecar(pods: tuple[Pod, Pod]) -> None:
    client, server = pods
    start_app(server, "banner", 2525)
    relay = start_relay(client)
    intercept(client)

    result = call(client, server.ip, 2525, "--server-first", "--send", "EHLO client\r\n")
    assert result["greeting"] == "220 banner.example ready\r\n"
    assert result["reply"] == "250 EHLO client\r\n"
    [record] = records(relay, 1)
    assert record["protocol"] == "tcp"
