"""The pod's interception rules: nat-table chains that send its TCP connections to the sidecar.

`outrigger iptables` (the init container's command) installs them. The rules are a pure function
of the `Interception` settings and the address family (`install_input`); what touches the system
is only `Tables` (iptables-save to read, iptables-restore to write). Istio's chains, under our
names:

- `OUTRIGGER_INBOUND` (from PREROUTING): connections arriving at the pod. The sidecar's listener
  ports and the excluded inbound ports return; everything else goes to `OUTRIGGER_IN_REDIRECT`,
  which redirects to the inbound port (15006). REDIRECT in PREROUTING delivers to the address of
  the interface it came in on, the pod IP, so the inbound listener binds 0.0.0.0 (and ::).
- `OUTRIGGER_OUTPUT` (from OUTPUT): connections the pod opens. Returned, in this order: the
  sidecar's own (uid 1337: its upstream connections must reach the network, or they would loop
  back into it), everything leaving through `lo` (loopback, and the app calling its own pod IP,
  which Linux routes over lo; this is also the sidecar's inbound forward to the app at the pod
  IP), the excluded ports and the excluded CIDRs. Then the included CIDRs (default every
  destination) go to `OUTRIGGER_REDIRECT`, which redirects to the outbound port (15001).
  REDIRECT in OUTPUT delivers to 127.0.0.1 (::1 for IPv6), so the outbound listener binds there.

Unlike Istio, the sidecar's own connections to its pod IP are not sent to its inbound listener
(Istio's `-o lo ! -d 127.0.0.1 --uid-owner 1337 -j ISTIO_IN_REDIRECT`, which needs the proxy to
forward inbound traffic from 127.0.0.6 to avoid looping): a call through a Service whose endpoint
is this very pod reaches the app directly, with the outbound side's policy only.

Applying is atomic: one `iptables-restore --noflush` per family. Declaring a chain creates it or
empties it, so a second run replaces our chains' rules; the jumps into them from PREROUTING and
OUTPUT are deleted (as iptables-save lists them) in the same transaction before being added
again, so running twice gives the same rules. Nothing outside our chains and jumps is touched.
IPv6 rules (ip6tables-restore) are installed when the pod has an IPv6 address beyond loopback
and link-local.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mesh.interception import (
    Interception,
    InterceptionError,
    Network,
    parse_cidrs,
    parse_include_cidrs,
    parse_port,
    parse_ports,
    parse_uid,
)

INBOUND: Final = "OUTRIGGER_INBOUND"
IN_REDIRECT: Final = "OUTRIGGER_IN_REDIRECT"
OUTPUT: Final = "OUTRIGGER_OUTPUT"
REDIRECT: Final = "OUTRIGGER_REDIRECT"
CHAINS: Final = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# The jumps from the built-in chains into ours, as iptables-save spells them.
JUMPS: Final = (f"-A PREROUTING -p tcp -j {INBOUND}", f"-A OUTPUT -p tcp -j {OUTPUT}")

COMMAND_TIMEOUT: Final = 30.0  # seconds for one iptables-save or iptables-restore


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # "IPv4" | "IPv6"
    version: int  # 4 | 6
    restore: str  # the restore command
    save: str  # the save command


IPV4: Final = Family("IPv4", 4, "iptables-restore", "iptables-save")
IPV6: Final = Family("IPv6", 6, "ip6tables-restore", "ip6tables-save")


class IptablesError(Exception):
    """Reading or writing the rules failed; the message says which command and why."""


# --- the rules (pure) ------------------------------------------------------------------------


def chain_rules(settings: Interception, family: Family) -> list[tuple[str, list[str]]]:
    """Our chains' rules and the jumps into them, in groups of (comment, rules)."""
    inbound_returns = sorted(
        {settings.inbound_port, settings.outbound_port, *settings.exclude_inbound_ports}
    )
    excluded = _of_family(settings.exclude_outbound_cidrs, family)
    if settings.include_outbound_cidrs is None:
        redirect = [f"-A {OUTPUT} -j {REDIRECT}"]
        included = "every other destination"
    else:
        nets = _of_family(settings.include_outbound_cidrs, family)
        redirect = [f"-A {OUTPUT} -d {net} -j {REDIRECT}" for net in nets]
        included = "the included CIDRs" if nets else f"no {family.name} destination (none included)"
    return [
        (
            "redirect targets: the sidecar's inbound and outbound listeners",
            [
                f"-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {settings.inbound_port}",
                f"-A {REDIRECT} -p tcp -j REDIRECT --to-ports {settings.outbound_port}",
            ],
        ),
        (
            "inbound: the sidecar's own and excluded ports stay, the rest goes to the sidecar",
            [f"-A {INBOUND} -p tcp --dport {port} -j RETURN" for port in inbound_returns]
            + [f"-A {INBOUND} -p tcp -j {IN_REDIRECT}"],
        ),
        (
            f"outbound: the sidecar's (uid {settings.proxy_uid}) and lo (loopback, pod IP) stay",
            [
                f"-A {OUTPUT} -m owner --uid-owner {settings.proxy_uid} -j RETURN",
                f"-A {OUTPUT} -o lo -j RETURN",
            ],
        ),
        (
            "outbound: excluded ports and CIDRs stay",
            [
                f"-A {OUTPUT} -p tcp --dport {port} -j RETURN"
                for port in settings.exclude_outbound_ports
            ]
            + [f"-A {OUTPUT} -d {net} -j RETURN" for net in excluded],
        ),
        (f"outbound: {included} goes to the sidecar", redirect),
        ("the jumps into our chains", list(JUMPS)),
    ]


def rules(settings: Interception, family: Family) -> list[str]:
    """Every rule `install_input` adds, in order, without comments."""
    return [rule for _, group in chain_rules(settings, family) for rule in group]


def install_input(settings: Interception, family: Family, jumps: tuple[str, ...] = ()) -> str:
    """The iptables-restore --noflush input that installs the rules.

    `jumps` are the jumps into our chains already there (`installed_jumps` of iptables-save):
    they are deleted first, in the same transaction, so that a second run does not add them
    twice. Without them, this is the input for a pod without our rules (what --dry-run prints).
    """
    lines = [f"# {family.name}: {family.restore} --noflush", "*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS]  # creates, or empties, each chain
    if jumps:
        lines.append("# the jumps a previous run added")
        lines += ["-D" + jump[2:] for jump in jumps]
    for comment, group in chain_rules(settings, family):
        if group:
            lines.append(f"# {comment}")
            lines += group
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def cleanup_input(family: Family, jumps: tuple[str, ...] = JUMPS) -> str:
    """The iptables-restore --noflush input that removes our jumps and chains."""
    lines = [f"# {family.name}: {family.restore} --noflush", "*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS]  # empties them, so they can go
    lines += ["-D" + jump[2:] for jump in jumps]
    lines += [f"-X {chain}" for chain in CHAINS]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def installed_jumps(save_output: str) -> tuple[str, ...]:
    """The rules in iptables-save output that jump into one of our chains from another chain."""
    found: list[str] = []
    for line in save_output.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "-A" or words[1] in CHAINS:
            continue
        for flag in ("-j", "-g"):
            if flag in words[:-1] and words[words.index(flag) + 1] in CHAINS:
                found.append(line.strip())
    return tuple(found)


def has_our_chains(save_output: str) -> bool:
    return any(
        line.split()[0][1:] in CHAINS for line in save_output.splitlines() if line[:1] == ":"
    )


def has_ipv6(if_inet6: str) -> bool:
    """Whether /proc/net/if_inet6 lists an address beyond loopback (scope host) and link-local."""
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3] not in ("10", "20"):
            return True
    return False


def _of_family(networks: tuple[Network, ...], family: Family) -> list[Network]:
    return [net for net in networks if net.version == family.version]


# --- the system ------------------------------------------------------------------------------


class Tables:
    """Runs iptables-save and iptables-restore (or their IPv6 twins) for one family."""

    def __init__(self, family: Family) -> None:
        self.family = family

    def save(self) -> str:
        return self._run([self.family.save, "-t", "nat"], None)

    def restore(self, text: str) -> None:
        self._run([self.family.restore, "--noflush"], text)

    def _run(self, argv: list[str], stdin: str | None) -> str:
        if shutil.which(argv[0]) is None:
            raise IptablesError(
                f"{argv[0]} is not on PATH: install iptables (Debian: apt-get install iptables)"
            )
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise IptablesError(
                f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT:g}s"
            ) from None
        if done.returncode != 0:
            detail = done.stderr.strip() or f"exit status {done.returncode}"
            hint = ""
            if "ermission denied" in detail or "must be root" in detail:
                hint = " (run it as root with the NET_ADMIN and NET_RAW capabilities)"
            raise IptablesError(f"{' '.join(argv)} failed: {detail}{hint}")
        return done.stdout


def pod_families(if_inet6: Path = Path("/proc/net/if_inet6")) -> list[Family]:
    """IPv4 always; IPv6 too when the pod has an IPv6 address beyond loopback and link-local."""
    try:
        text = if_inet6.read_text()
    except OSError:  # IPv6 is off in this kernel
        return [IPV4]
    return [IPV4, IPV6] if has_ipv6(text) else [IPV4]


def install(settings: Interception, families: list[Family]) -> list[str]:
    """Install the rules; returns the iptables-restore inputs applied, one per family."""
    applied: list[str] = []
    for family in families:
        tables = Tables(family)
        text = install_input(settings, family, installed_jumps(tables.save()))
        tables.restore(text)
        applied.append(text)
    return applied


def cleanup(families: list[Family]) -> list[str]:
    """Remove our jumps and chains where there are any; returns the inputs applied."""
    applied: list[str] = []
    for family in families:
        tables = Tables(family)
        saved = tables.save()
        jumps = installed_jumps(saved)
        if jumps or has_our_chains(saved):
            text = cleanup_input(family, jumps)
            tables.restore(text)
            applied.append(text)
    return applied


# --- the command -----------------------------------------------------------------------------


def settings_from_args(args: argparse.Namespace) -> Interception:
    """The settings the flags name; an InterceptionError names the flag and its form."""
    return Interception(
        proxy_uid=parse_uid("--proxy-uid", args.proxy_uid),
        outbound_port=parse_port("--outbound-port", args.outbound_port),
        inbound_port=parse_port("--inbound-port", args.inbound_port),
        exclude_inbound_ports=parse_ports("--exclude-inbound-ports", args.exclude_inbound_ports),
        exclude_outbound_ports=parse_ports("--exclude-outbound-ports", args.exclude_outbound_ports),
        include_outbound_cidrs=parse_include_cidrs(
            "--include-outbound-cidrs", args.include_outbound_cidrs
        ),
        exclude_outbound_cidrs=parse_cidrs("--exclude-outbound-cidrs", args.exclude_outbound_cidrs),
    )


def run_iptables(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except InterceptionError as exc:
        print(f"outrigger iptables: {exc}", file=sys.stderr)
        return 2
    families = pod_families()
    if args.dry_run:
        for family in families:
            text = cleanup_input(family) if args.cleanup else install_input(settings, family)
            sys.stdout.write(text)
        return 0
    try:
        applied = cleanup(families) if args.cleanup else install(settings, families)
    except IptablesError as exc:
        print(f"outrigger iptables: {exc}", file=sys.stderr)
        return 1
    if args.cleanup and not applied:
        print("outrigger iptables: no Outrigger rules to remove")
    for text in applied:
        sys.stdout.write(text)
    return 0
