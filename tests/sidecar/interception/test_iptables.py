"""The interception rules, read as the kernel reads them.

`verdict` walks the generated chains for one new connection the way netfilter's nat table does
(first match wins, a user chain returns to its caller, REDIRECT ends the walk), for the few
matches the rules use; it refuses anything else, so a rule it cannot read fails the test rather
than being skipped. The properties then state the interception contract directly. The
namespace tests (tests/e2e/test_interception.py) show the kernel agrees.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from mesh.interception import Interception, Network
from sidecar.interception.iptables import (
    CHAINS,
    IPV4,
    IPV6,
    JUMPS,
    cleanup_input,
    has_ipv6,
    install_input,
    installed_jumps,
    rules,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Connection:
    hook: str  # "OUTPUT": the pod opens it; "PREROUTING": it arrives at the pod
    dst: Address
    dport: int
    uid: int = 0
    out: str = "eth0"  # the interface the route goes out of (OUTPUT only)


def verdict(rule_lines: list[str], conn: Connection) -> int | None:
    """The port the connection is redirected to, or None when it goes where it was going."""
    chains: dict[str, list[list[str]]] = {}
    for line in rule_lines:
        words = line.split()
        assert words[0] == "-A", line
        chains.setdefault(words[1], []).append(words[2:])

    def walk(chain: str) -> int | str | None:
        for rule in chains.get(chain, []):
            target, args = _target(rule)
            if not _matches(args, conn):
                continue
            if target[0] == "RETURN":
                return "return"
            if target[0] == "REDIRECT":
                assert target[1] == "--to-ports"
                return int(target[2])
            result = walk(target[0])
            if result != "return":
                return result
        return "return"

    result = walk(conn.hook)
    return None if result == "return" else int(result)


def _target(rule: list[str]) -> tuple[list[str], list[str]]:
    j = rule.index("-j")
    return rule[j + 1 :], rule[:j]


def _matches(args: list[str], conn: Connection) -> bool:
    i = 0
    while i < len(args):
        flag, value = args[i], args[i + 1] if i + 1 < len(args) else ""
        if flag == "-p":
            assert value == "tcp"
        elif flag == "-m":
            assert value in ("owner", "tcp")
        elif flag == "--dport":
            if conn.dport != int(value):
                return False
        elif flag == "-d":
            net = ipaddress.ip_network(value)
            if net.version != conn.dst.version or conn.dst not in net:
                return False
        elif flag == "-o":
            assert conn.hook == "OUTPUT", "-o only means something for OUTPUT"
            if conn.out != value:
                return False
        elif flag == "--uid-owner":
            assert conn.hook == "OUTPUT"
            if conn.uid != int(value):
                return False
        else:
            raise AssertionError(f"the test's reader does not know {flag!r} in {args}")
        i += 2
    return True


def family_rules(settings: Interception, dst: Address) -> list[str]:
    return rules(settings, IPV4 if dst.version == 4 else IPV6)


# --- the contract, as properties ---------------------------------------------------------------

NETWORKS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "10.96.0.0/12", "192.168.1.0/24", "169.254.169.254/32", "fd00::/8")
]
ADDRESSES = [
    ipaddress.ip_address(a)
    for a in ("10.1.2.3", "10.96.0.10", "192.168.1.7", "169.254.169.254", "8.8.8.8")
] + [ipaddress.ip_address(a) for a in ("fd00::5", "2001:db8::1")]
PORTS = st.sampled_from([80, 443, 3306, 8080, 15000, 15001, 15006, 15021, 15090])


@st.composite
def settings_strategy(draw: st.DrawFn) -> Interception:
    nets = st.lists(st.sampled_from(NETWORKS), max_size=3, unique=True)
    include = draw(st.one_of(st.none(), nets))
    return Interception(
        proxy_uid=draw(st.sampled_from([1337, 2000])),
        exclude_inbound_ports=tuple(sorted(set(draw(st.lists(PORTS, max_size=3))))),
        exclude_outbound_ports=tuple(sorted(set(draw(st.lists(PORTS, max_size=3))))),
        include_outbound_cidrs=None if include is None else tuple(include),
        exclude_outbound_cidrs=tuple(draw(nets)),
    )


def inside(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(net.version == address.version and address in net for net in networks)


@given(
    settings_strategy(),
    st.sampled_from(ADDRESSES),
    PORTS,
    st.sampled_from([0, 1000, 1337, 2000]),
    st.sampled_from(["eth0", "lo"]),
)
def test_outbound_goes_to_the_sidecar_unless_an_exception_says_otherwise(
    settings: Interception, dst: Address, dport: int, uid: int, out: str
) -> None:
    conn = Connection("OUTPUT", dst, dport, uid=uid, out=out)
    stays = (
        uid == settings.proxy_uid  # the sidecar's own connections: no loop
        or out == "lo"  # loopback and the pod's own IP
        or dport in settings.exclude_outbound_ports
        or inside(dst, settings.exclude_outbound_cidrs)
        or (
            settings.include_outbound_cidrs is not None
            and not inside(dst, settings.include_outbound_cidrs)
        )
    )
    expected = None if stays else settings.outbound_port
    assert verdict(family_rules(settings, dst), conn) == expected


@given(settings_strategy(), st.sampled_from(ADDRESSES), PORTS)
def test_inbound_goes_to_the_sidecar_except_its_own_and_excluded_ports(
    settings: Interception, dst: Address, dport: int
) -> None:
    conn = Connection("PREROUTING", dst, dport)
    own = {settings.inbound_port, settings.outbound_port}
    stays = dport in own or dport in settings.exclude_inbound_ports
    expected = None if stays else settings.inbound_port
    assert verdict(family_rules(settings, dst), conn) == expected


def test_the_sidecar_listener_ports_never_loop_even_when_not_listed() -> None:
    settings = Interception(outbound_port=16001, inbound_port=16006)
    pod_ip = ipaddress.ip_address("10.1.2.3")
    for port in (16001, 16006):
        assert verdict(rules(settings, IPV4), Connection("PREROUTING", pod_ip, port)) is None
    assert verdict(rules(settings, IPV4), Connection("PREROUTING", pod_ip, 8080)) == 16006


def test_an_include_list_of_ipv4_networks_redirects_no_ipv6_traffic() -> None:
    settings = Interception(include_outbound_cidrs=(ipaddress.ip_network("10.96.0.0/12"),))
    assert not [rule for rule in rules(settings, IPV6) if "OUTRIGGER_REDIRECT" in rule[20:]]
    v6 = Connection("OUTPUT", ipaddress.ip_address("2001:db8::1"), 443)
    assert verdict(rules(settings, IPV6), v6) is None


def test_an_empty_include_list_redirects_no_outbound_traffic() -> None:
    settings = Interception(include_outbound_cidrs=())
    conn = Connection("OUTPUT", ipaddress.ip_address("10.1.2.3"), 80)
    assert verdict(rules(settings, IPV4), conn) is None
    inbound = Connection("PREROUTING", ipaddress.ip_address("10.1.2.3"), 80)
    assert verdict(rules(settings, IPV4), inbound) == 15006


# --- the restore input ---------------------------------------------------------------------------


def test_install_input_declares_only_our_chains_and_commits_once() -> None:
    text = install_input(Interception(), IPV4)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == "*nat"
    assert lines[-1] == "COMMIT"
    assert [line for line in lines if line.startswith(":")] == [f":{c} - [0:0]" for c in CHAINS]
    added = [line for line in lines if line.startswith("-A")]
    assert added == rules(Interception(), IPV4)
    # every rule is in our chains, but for exactly the two jumps into them
    assert [line for line in added if line.split()[1] not in CHAINS] == list(JUMPS)
    assert not [line for line in lines if line.startswith(("-D", "-F", "-X", "-I"))]


def test_a_second_install_deletes_the_jumps_it_finds_before_adding_them_again() -> None:
    saved = SAVED_WITH_OUR_RULES
    jumps = installed_jumps(saved)
    assert jumps == JUMPS
    text = install_input(Interception(), IPV4, jumps)
    lines = text.splitlines()
    deletes = [i for i, line in enumerate(lines) if line.startswith("-D")]
    adds = [i for i, line in enumerate(lines) if line in JUMPS]
    assert [lines[i] for i in deletes] == [
        "-D PREROUTING -p tcp -j OUTRIGGER_INBOUND",
        "-D OUTPUT -p tcp -j OUTRIGGER_OUTPUT",
    ]
    assert max(deletes) < min(adds)


def test_installed_jumps_finds_jumps_from_any_other_chain_and_ignores_ours() -> None:
    saved = SAVED_WITH_OUR_RULES + "-A CNI_HOOK -d 10.0.0.0/8 -g OUTRIGGER_OUTPUT\n"
    assert installed_jumps(saved) == (*JUMPS, "-A CNI_HOOK -d 10.0.0.0/8 -g OUTRIGGER_OUTPUT")
    assert installed_jumps(SAVED_EMPTY) == ()


def test_cleanup_deletes_the_jumps_found_then_our_chains() -> None:
    lines = cleanup_input(IPV6, ("-A OUTPUT -p tcp -j OUTRIGGER_OUTPUT",)).splitlines()
    assert lines[0] == "# IPv6: ip6tables-restore --noflush"
    assert lines[-(len(CHAINS) + 2) :] == [
        "-D OUTPUT -p tcp -j OUTRIGGER_OUTPUT",
        *[f"-X {chain}" for chain in CHAINS],
        "COMMIT",
    ]


def test_ipv6_counts_when_the_pod_has_an_address_beyond_loopback_and_link_local() -> None:
    loopback = "00000000000000000000000000000001 01 80 10 80       lo\n"
    link_local = "fe80000000000000a8bbccfffedd0011 02 40 20 80     eth0\n"
    unique_local = "fd000000000000000000000000000002 02 40 00 80     eth0\n"
    assert not has_ipv6("")
    assert not has_ipv6(loopback + link_local)
    assert has_ipv6(loopback + link_local + unique_local)


SAVED_EMPTY = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
"""

# What iptables-save printed after `outrigger iptables` in a network namespace.
SAVED_WITH_OUR_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:OUTRIGGER_INBOUND - [0:0]
:OUTRIGGER_IN_REDIRECT - [0:0]
:OUTRIGGER_OUTPUT - [0:0]
:OUTRIGGER_REDIRECT - [0:0]
-A PREROUTING -p tcp -j OUTRIGGER_INBOUND
-A OUTPUT -p tcp -j OUTRIGGER_OUTPUT
-A OUTRIGGER_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A OUTRIGGER_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A OUTRIGGER_INBOUND -p tcp -j OUTRIGGER_IN_REDIRECT
-A OUTRIGGER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTRIGGER_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A OUTRIGGER_OUTPUT -o lo -j RETURN
-A OUTRIGGER_OUTPUT -j OUTRIGGER_REDIRECT
-A OUTRIGGER_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""
