"""The image's recipe (no container engine runs here, so its parts are checked one by one):
the Dockerfile builds in two stages from a slim Python matching the lock, installs from the lock
with the install script, ships iptables, runs as uid 1337 with `outrigger` as entrypoint, and
copies only what .dockerignore lets through; requirements.lock pins exactly what the tests run
with. `make image-venv` (run by CI) performs the build stage's install in a fresh venv."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import sys
from pathlib import Path

from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def instructions() -> list[dict[str, str]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    return [i for i in parser.structure if i["instruction"] not in ("COMMENT",)]


def stages() -> list[list[dict[str, str]]]:
    found: list[list[dict[str, str]]] = []
    for inst in instructions():
        if inst["instruction"] == "FROM":
            found.append([])
        if found:
            found[-1].append(inst)
    return found


def test_the_image_is_two_stages_from_slim_python_of_the_version_the_lock_was_made_with() -> None:
    text = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-")
    build, final = stages()
    assert (
        build[0]["value"] == "${PYTHON_IMAGE} AS build" and final[0]["value"] == "${PYTHON_IMAGE}"
    )


def test_dependencies_come_from_the_lock_through_the_install_script_make_install_uses() -> None:
    build, _ = stages()
    (run,) = [i["value"] for i in build if i["instruction"] == "RUN"]
    assert "scripts/install.sh /opt/outrigger/bin/python -c requirements.lock" in run
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install.sh $(BIN)/python -c requirements.lock -e '.[dev]'" in makefile
    assert "--force-reinstall" not in makefile  # the fix lives in the script only
    script = (ROOT / "scripts/install.sh").read_text()
    assert "--no-deps --force-reinstall" in script and "opentelemetry-proto==" in script
    assert (ROOT / "scripts/install.sh").stat().st_mode & 0o111


def test_the_final_image_has_iptables_runs_as_1337_and_enters_outrigger() -> None:
    _, final = stages()
    runs = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert "apt-get install -y --no-install-recommends iptables" in runs
    assert "--uid 1337" in runs
    (user,) = [i["value"] for i in final if i["instruction"] == "USER"]
    assert user.split(":")[0] == "1337"
    (entrypoint,) = [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["outrigger"]
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert copies == ["--from=build /opt/outrigger /opt/outrigger"]


def test_every_copied_path_exists_and_passes_the_dockerignore() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()  # everything else stays out
    build, _ = stages()
    for inst in build:
        if inst["instruction"] != "COPY":
            continue
        *sources, _dest = shlex.split(inst["value"])
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source in allowed, f"{source} is copied but .dockerignore excludes it"


def lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9_.\-]+", name), f"not a pin: {line!r}"
        pins[canonicalize_name(name)] = version
    return pins


def closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """The installed distributions `root[extras]` needs, transitively."""
    seen: set[str] = set()
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            env = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
                continue
            key = canonicalize_name(req.name)
            if key == canonicalize_name(root):
                todo.append((name, tuple(req.extras)))
                continue
            if key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_the_lock_pins_every_dependency_at_the_version_the_tests_run_with() -> None:
    pins = lock()
    assert "outrigger" not in pins
    needed = closure("outrigger", ("dev",))
    assert {"grpcio", "xds-protos", "opentelemetry-proto", "helm-python-sdk"} <= needed
    unpinned = sorted(needed - set(pins))
    assert not unpinned, f"not in requirements.lock (run `make lock`): {unpinned}"
    differs = {
        name: (pins[name], importlib.metadata.version(name))
        for name in needed
        if importlib.metadata.version(name) != pins[name]
    }
    assert not differs, f"installed versions differ from the lock (lock, installed): {differs}"
