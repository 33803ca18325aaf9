"""The container image, built here and started here.

``deploy/image/build.sh`` makes a Debian base with debootstrap (Debian's packages, no registry),
commits it with buildah from scratch and builds the repository's ``Containerfile`` on it; both
images are cached in the containers storage under a hash of their inputs, so a second run
reuses them. ``deploy/image/run.sh`` starts the image with podman (runc, read-only root
filesystem, no capabilities, the host's network), and the official socket.io-client drives it.

Needs root, debootstrap, buildah, podman and runc (``.ci/run`` installs them): without them
these tests skip, or FAIL when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from conftest import http_json

import redis_fixtures
from redis_fixtures import free_port, require_binary, wait_until
from roomcast.auth import Authenticator, AuthSettings

if TYPE_CHECKING:
    from conftest import NodeScripts

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "deploy" / "image" / "build.sh"
RUN = REPO / "deploy" / "image" / "run.sh"
BUILD_TIMEOUT = 900.0
"""Seconds a build from nothing may take (debootstrap and pip download over the network)."""
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
IMAGE_USER = "10001:10001"
ORIGIN = "https://app.example"

redis_url = redis_fixtures.redis_url


def _require_root() -> None:
    if os.geteuid() != 0:
        message = "building and running the image needs root (debootstrap, buildah's storage)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True, slots=True)
class Image:
    ref: str
    inspect: dict[str, Any]
    build_seconds: float
    build_log: str


@pytest.fixture(scope="module")
def image() -> Image:
    """The image of this checkout: built by build.sh, or its cached build for the same inputs."""
    _require_root()
    for tool in ("debootstrap", "buildah", "podman", "runc"):
        require_binary(tool)
    started = time.monotonic()
    result = subprocess.run(
        [str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(f"build.sh failed ({result.returncode}):\n{result.stderr[-8000:]}")
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("image="), result.stdout
    ref = last.removeprefix("image=")
    inspected = subprocess.run(
        ["podman", "image", "inspect", ref], capture_output=True, text=True, check=True
    )
    [inspect] = json.loads(inspected.stdout)
    print(f"\n[figure] build.sh: {seconds:.1f} s\n{result.stderr.strip()}")
    return Image(ref=ref, inspect=inspect, build_seconds=seconds, build_log=result.stderr)


@dataclass
class Container:
    name: str
    port: int
    ops_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def pid(self) -> int:
        """The host pid of the container's first process (roomcast itself)."""
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Pid}}", self.name],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())


@dataclass(frozen=True, slots=True)
class Secrets:
    jwt_secret: str
    api_key: str


@pytest.fixture(scope="module")
def image_secrets() -> Secrets:
    return Secrets(jwt_secret=secrets.token_urlsafe(48), api_key=secrets.token_urlsafe(24))


@pytest.fixture(scope="module")
def container(
    image: Image, image_secrets: Secrets, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """The image started by run.sh as the manifests run it (production, Redis, ops listener)."""
    port, ops_port = free_port(), free_port()
    name = f"roomcast-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path_factory.mktemp("container") / "podman.log"
    # The secrets reach podman through its environment ("-e NAME" passes the value on).
    env = {
        **os.environ,
        "ROOMCAST_JWT_SECRET": image_secrets.jwt_secret,
        "ROOMCAST_API_KEY": image_secrets.api_key,
    }
    command = [str(RUN), "--name", name]
    command += ["-e", "ROOMCAST_JWT_SECRET", "-e", "ROOMCAST_API_KEY"]
    command += ["-e", f"ROOMCAST_ALLOWED_ORIGINS={ORIGIN}", "-e", f"ROOMCAST_PORT={port}"]
    command += ["-e", f"ROOMCAST_OPS_LISTEN=127.0.0.1:{ops_port}"]
    # The host's network: the container reaches the test's redis-server on the loopback.
    command += ["-e", f"ROOMCAST_REDIS_URL={redis_url}", "-e", f"ROOMCAST_REDIS_PREFIX={name}"]
    command += [image.ref]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    started = Container(name=name, port=port, ops_port=ops_port, process=process, log_path=log_path)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the container exited with {process.returncode}:\n{started.log()}")
        try:
            return http_json("GET", f"{started.url}/readyz", timeout=1.0)[0] == 200
        except OSError:
            return False

    began = time.monotonic()
    wait_until(ready, timeout=START_TIMEOUT, what="the container's /readyz")
    print(f"\n[figure] container ready {time.monotonic() - began:.2f} s after podman run")
    yield started
    if process.poll() is None:
        subprocess.run(["podman", "kill", name], capture_output=True, check=False)
        process.wait(timeout=STOP_TIMEOUT)


def test_image_runs_as_non_root_with_roomcast_serve(image: Image) -> None:
    """The image runs ``roomcast serve`` as user 10001, listens on 8000, in production mode."""
    config = image.inspect["Config"]
    assert config["User"] == IMAGE_USER
    assert config["Entrypoint"] == ["roomcast", "serve"]
    assert "8000/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["ROOMCAST_HOST"] == "0.0.0.0"
    assert env["ROOMCAST_PORT"] == "8000"
    assert env["ROOMCAST_PRODUCTION"] == "1"
    assert env["PATH"].startswith("/opt/roomcast/bin:")
    assert config["StopSignal"] == "SIGTERM"
    size = int(image.inspect["Size"])
    layers = image.inspect["RootFS"]["Layers"]
    compressed = _compressed_size(image.ref)
    print(
        f"\n[figure] image {image.ref}: {size / 2**20:.1f} MiB uncompressed, "
        f"{compressed / 2**20:.1f} MiB gzip-compressed, {len(layers)} layers"
    )
    assert size > 0


def _compressed_size(ref: str) -> int:
    """Bytes of the image saved as an archive and gzipped (about what a registry stores)."""
    save = subprocess.Popen(
        ["podman", "save", "--format", "oci-archive", ref], stdout=subprocess.PIPE
    )
    gzip = subprocess.run(["gzip", "-6"], stdin=save.stdout, capture_output=True, check=True)
    assert save.stdout is not None
    save.stdout.close()
    assert save.wait() == 0
    return len(gzip.stdout)


def test_container_serves_the_official_client(
    container: Container, image_secrets: Secrets, node_scripts: NodeScripts
) -> None:
    """Started image: clients with a JWT connect (websocket and polling), join, get a publication."""
    status, health = http_json("GET", f"{container.url}/healthz")
    assert (status, health) == (200, {"status": "ok"})
    status, ready = http_json("GET", f"{container.url}/readyz")
    assert status == 200
    assert ready["ready"] is True
    assert ready["broker"] == "connected"
    token = Authenticator(AuthSettings(secret=image_secrets.jwt_secret)).mint(
        "alice", ["doc:*"], [], ttl_seconds=600
    )
    config = {
        "url": container.url,
        "opsUrl": container.ops_url,
        "token": token,
        "apiKey": image_secrets.api_key,
        "room": "doc:image",
        "origin": ORIGIN,
    }
    result = node_scripts.run("image.mjs", config, timeout=30.0)
    assert result["joins"] == [[{"ok": True}], [{"ok": True}]]
    assert result["published"]["status"] == 202
    offset = result["published"]["body"]["offset"]
    expected = [{"from": "image", "n": 1}, offset]
    assert result["news"] == [expected, expected]
    assert result["transports"] == ["websocket", "polling"]


def test_container_serves_metrics_on_the_ops_listener_only(container: Container) -> None:
    """/metrics, with the HPA's roomcast_connections, is on the ops port and 404 on the main one."""
    with urllib.request.urlopen(f"{container.ops_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert re.search(r"^roomcast_connections [0-9.e+]+$", text, re.M), text[:2000]
    status, _body = http_json("GET", f"{container.url}/metrics")
    assert status == 404


def test_container_process_is_non_root(container: Container) -> None:
    """roomcast in the container runs as uid 10001, seen from the host's /proc."""
    status = Path(f"/proc/{container.pid()}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields["Uid"].split()
    assert uids == ["10001"] * 4, uids
    rss_kib = int(fields["VmRSS"].split()[0])
    print(f"\n[figure] roomcast RSS in the container: {rss_kib / 1024:.1f} MiB")


def test_container_healthcheck_passes(container: Container) -> None:
    """The image's HEALTHCHECK command (GET /healthz from inside) succeeds."""
    result = subprocess.run(
        ["podman", "healthcheck", "run", container.name],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prestop_hook_of_the_manifests_runs_in_the_image(container: Container) -> None:
    """The Deployment's preStop command exists in the image and runs as its user."""
    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    [roomcast] = deployment["spec"]["template"]["spec"]["containers"]
    command = roomcast["lifecycle"]["preStop"]["exec"]["command"]
    result = subprocess.run(
        ["podman", "exec", container.name, *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_container_drains_and_exits_zero_on_sigterm(container: Container) -> None:
    """``podman stop`` sends SIGTERM; roomcast (pid 1 in the container) drains and exits 0."""
    # podman stop would SIGKILL after --time seconds; exit code 0 means roomcast left by itself.
    subprocess.run(
        ["podman", "stop", "--time", str(int(STOP_TIMEOUT)), container.name],
        capture_output=True,
        check=True,
        timeout=STOP_TIMEOUT + 10,
    )
    code = container.process.wait(timeout=STOP_TIMEOUT)
    log = container.log()
    assert code == 0, log
    assert "draining" in log, log
