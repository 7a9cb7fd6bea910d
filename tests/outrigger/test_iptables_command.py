from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from mesh.interception import Interception
from outrigger.cli import main
from sidecar.interception.iptables import IPV4, cleanup_input, install_input


def test_dry_run_prints_the_restore_input_and_changes_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["iptables", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(install_input(Interception(), IPV4))


def test_the_flags_the_injector_builds_give_back_the_same_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Interception(
        proxy_uid=1337,
        outbound_port=15001,
        inbound_port=15006,
        exclude_inbound_ports=(15000, 15001, 15006, 15021, 15090),
        exclude_outbound_ports=(3306,),
        include_outbound_cidrs=(ipaddress.ip_network("10.96.0.0/12"),),
        exclude_outbound_cidrs=(ipaddress.ip_network("169.254.169.254/32"),),
    )
    assert main(["iptables", *settings.args(), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(install_input(settings, IPV4))


def test_dry_run_cleanup_prints_what_cleanup_removes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iptables", "--cleanup", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(cleanup_input(IPV4))


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--exclude-inbound-ports", "15021,health", "comma-separated ports 1-65535"),
        ("--exclude-outbound-cidrs", "10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("--include-outbound-cidrs", "everything", "* (every destination) or"),
        ("--outbound-port", "70000", "a number 1-65535"),
        ("--proxy-uid", "istio-proxy", "the form is a number"),
    ],
)
def test_a_bad_flag_value_exits_2_naming_the_flag_and_the_form(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, says: str
) -> None:
    assert main(["iptables", flag, value, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"outrigger iptables: {flag}: ")
    assert says in captured.err


def test_the_readme_shows_what_dry_run_prints(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    _, _, rest = readme.partition("$ outrigger iptables ")
    assert rest, "the README's 'How interception works' shows a dry run"
    flags_text, _, rest = rest.partition("\n# IPv4")
    shown = "# IPv4" + rest.partition("```")[0]
    flags = flags_text.replace("\\\n", " ").split()
    assert flags[-1] == "--dry-run"
    assert main(["iptables", *flags]) == 0
    assert capsys.readouterr().out.startswith(shown)
