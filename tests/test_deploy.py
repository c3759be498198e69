"""Every file in deploy/ is checked: by the tool that reads it where this machine has one, else by
parsing it, and against the others and relayprobe's own settings so that ports, paths and users
agree across the systemd unit, the example config, the container image and Kubernetes."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from relayprobe.operations.config import Settings, env_name, load_settings
from tests.infra.dataservers import redis_available
from tests.infra.skip import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "relayprobe.service"
EXAMPLE_CONFIG = DEPLOY / "relayprobe.toml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CONFIG = DEPLOY / "haproxy.cfg"
K8S_DEPLOYMENT = DEPLOY / "kubernetes" / "deployment.yaml"
K8S_SERVICE = DEPLOY / "kubernetes" / "service.yaml"
K8S_CONFIGMAP = DEPLOY / "kubernetes" / "configmap.yaml"
K8S_REPLICAS = DEPLOY / "kubernetes" / "replicas" / "deployment.yaml"
K8S_REDIS = DEPLOY / "kubernetes" / "shared" / "redis.yaml"
K8S_POSTGRES = DEPLOY / "kubernetes" / "shared" / "postgres.yaml"
K8S_SHARED_ENV = DEPLOY / "kubernetes" / "shared" / "shared.env.example"
REPLICAS_COMPOSE = DEPLOY / "replicas" / "compose.yaml"
REPLICAS_HAPROXY = DEPLOY / "replicas" / "haproxy.cfg"
CHECKED = {
    UNIT,
    EXAMPLE_CONFIG,
    DOCKERFILE,
    COMPOSE,
    HAPROXY_CONFIG,
    K8S_DEPLOYMENT,
    K8S_SERVICE,
    K8S_CONFIGMAP,
    K8S_REPLICAS,
    K8S_REDIS,
    K8S_POSTGRES,
    K8S_SHARED_ENV,
    REPLICAS_COMPOSE,
    REPLICAS_HAPROXY,
}

INSTALLED_CONFIG = "/etc/relayprobe/relayprobe.toml"
VENV_RELAYPROBE = Path(sys.executable).with_name("relayprobe")
DOCKERFILE_INSTRUCTIONS = frozenset(
    {
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    }
)
HEALTHCHECK_OPTIONS = frozenset(
    {"interval", "timeout", "start-period", "start-interval", "retries"}
)
# Linux's PR_SET_MDWE (6.3+): the kernel's own form of systemd's MemoryDenyWriteExecute=.
_MDWE_EXEC = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_every_deploy_file_is_checked() -> None:
    present = {path for path in DEPLOY.rglob("*") if path.is_file()}
    assert present == CHECKED


# --- helpers --------------------------------------------------------------------------------------


def clean_environ() -> dict[str, str]:
    """The environment without RELAYPROBE_* variables, which would change the settings, and
    without proxy variables, which could send requests for loopback elsewhere."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("RELAYPROBE_") and not name.lower().endswith("_proxy")
    }


def load_file(path: Path, *, environ: dict[str, str] | None = None) -> Settings:
    return load_settings({"config": str(path)}, environ=environ or {})


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayprobe", "serve", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        env=clean_environ(),
        timeout=60,
        check=False,
    )


def need_tool(path: str) -> str:
    found = shutil.which(path)
    if found is None:
        skip_or_fail(f"{path} is not installed (run .ci/system-packages as root)")
    assert found is not None
    return found


def unit_directives() -> dict[str, list[str]]:
    """Each directive of the unit with its values in order (some, like SystemCallFilter, repeat)."""
    directives: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {raw!r}"
        directives.setdefault(key, []).append(value)
    return directives


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with the venv's relayprobe in place of the installed one, for systemd-analyze."""
    assert VENV_RELAYPROBE.exists(), VENV_RELAYPROBE
    commands = {shlex.split(value)[0] for value in unit_directives()["ExecStart"]}
    (installed,) = commands
    copy = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    copy.write_text(text.replace(installed, str(VENV_RELAYPROBE)), encoding="utf-8")
    return copy


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        # Docker drops comment lines everywhere, even inside a continued instruction.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword, arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_values(keyword: str) -> list[str]:
    return [arguments for found, arguments in dockerfile_instructions() if found == keyword]


def dockerfile_env() -> dict[str, str]:
    pairs = (
        item.partition("=") for value in dockerfile_values("ENV") for item in shlex.split(value)
    )
    return {name: value for name, _, value in pairs}


def dockerfile_exposed() -> set[int]:
    return {
        int(port.removesuffix("/tcp"))
        for value in dockerfile_values("EXPOSE")
        for port in value.split()
    }


def dockerfile_uid() -> int:
    (user,) = dockerfile_values("USER")
    return int(user.partition(":")[0])


def healthcheck_command() -> list[str]:
    (healthcheck,) = dockerfile_values("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    for option in options.split():
        name, sep, value = option.removeprefix("--").partition("=")
        assert option.startswith("--") and sep and value, option
        assert name in HEALTHCHECK_OPTIONS, option
    argv = json.loads(command)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), command
    return argv


def healthcheck_url() -> str:
    argv = healthcheck_command()
    assert argv[:2] == ["python", "-c"]
    (url,) = re.findall(r"'(http://[^']+)'", argv[2])
    return str(url)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert all(isinstance(document, dict) for document in documents), path
    return documents


def compose_service() -> dict[str, Any]:
    (document,) = load_yaml(COMPOSE)
    service: dict[str, Any] = document["services"]["relayprobe"]
    return service


def compose_settings() -> Settings:
    """The settings the compose service runs with: its mounted config and its variables."""
    service = compose_service()
    config_path = dockerfile_env()[env_name("config")]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in service["volumes"])}
    environ = {name: str(value) for name, value in service["environment"].items()}
    return load_file(COMPOSE.parent / mounts[config_path], environ=environ)


def k8s_template(path: Path = K8S_DEPLOYMENT) -> dict[str, Any]:
    """The pod template of the workload (Deployment, StatefulSet) that `path` begins with."""
    template: dict[str, Any] = load_yaml(path)[0]["spec"]["template"]
    return template


def k8s_container(path: Path = K8S_DEPLOYMENT) -> dict[str, Any]:
    (container,) = k8s_template(path)["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def k8s_config_text() -> str:
    (configmap,) = load_yaml(K8S_CONFIGMAP)
    text: str = configmap["data"]["relayprobe.toml"]
    return text


def k8s_settings(tmp_path: Path, *, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "relayprobe.toml"
    path.write_text(k8s_config_text(), encoding="utf-8")
    return load_file(path, environ=environ)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_status(url: str) -> int | None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


# --- systemd unit ---------------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown or misspelt directives are only warnings, naming the unit.
    assert unit.name not in output, output


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    # The threshold is ten times the printed level: 20 is "2.0 OK" (it is 1.5 today).
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_keeps_only_the_port_capability_and_its_state_directory() -> None:
    directives = unit_directives()
    assert directives["DynamicUser"] == ["yes"]
    assert directives["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert directives["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert directives["MemoryDenyWriteExecute"] == ["yes"]
    assert "PrivateUsers" not in directives  # the capability would not reach ports 23 and 25
    assert directives["Restart"] == ["on-failure"]
    assert directives["KillSignal"] == ["SIGTERM"]
    assert directives["TimeoutStopSec"] == ["10"]
    settings = load_file(EXAMPLE_CONFIG)
    (state_directory,) = directives["StateDirectory"]
    assert settings.state_dir == f"/var/lib/{state_directory}"
    # Each test holds two sockets; "thousands of sessions" with room to spare.
    (open_files,) = directives["LimitNOFILE"]
    assert int(open_files) >= max(2 * 5000, 4 * settings.max_sessions)
    ports = {endpoint.port for endpoint in settings.listen}
    assert settings.sink_listen is not None
    assert max(ports | {settings.sink_listen.port}) < 1024  # what the capability is for


def test_unit_commands_are_accepted_by_the_cli() -> None:
    directives = unit_directives()
    for command in directives["ExecStartPre"] + directives["ExecStart"]:
        argv = shlex.split(command)
        assert argv[1:4] == ["serve", "--config", INSTALLED_CONFIG], command
        check = argv[1:] if "--check-config" in argv else [*argv[1:], "--check-config"]
        check[check.index(INSTALLED_CONFIG)] = str(EXAMPLE_CONFIG)
        result = subprocess.run(
            [sys.executable, "-m", "relayprobe", *check],
            capture_output=True,
            text=True,
            env=clean_environ(),
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


@pytest.fixture
def served_example(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """relayprobe serving the example config on loopback ports, under MemoryDenyWriteExecute."""
    http_port = free_port()
    argv = [
        sys.executable,
        "-c",
        _MDWE_EXEC,
        str(VENV_RELAYPROBE),
        "serve",
        "--config",
        str(EXAMPLE_CONFIG),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--sink-listen",
        f"127.0.0.1:{free_port()}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--state-dir",
        str(tmp_path),
        "--log-format",
        "json",
    ]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_environ()
    )
    try:
        deadline = time.monotonic() + 15
        while http_status(f"http://127.0.0.1:{http_port}/readyz") != 200:
            if process.poll() is not None:
                output = process.communicate()[0]
                if "PR_SET_MDWE" in output:
                    pytest.skip(f"this kernel has no PR_SET_MDWE: {output.strip()}")
                pytest.fail(f"relayprobe exited {process.returncode}: {output}")
            assert time.monotonic() < deadline, "relayprobe was not ready within 15 s"
            time.sleep(0.1)
        yield process, http_port
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def test_example_serves_and_stops_under_memory_deny_write_execute(
    served_example: tuple[subprocess.Popen[str], int],
) -> None:
    process, http_port = served_example
    assert http_status(f"http://127.0.0.1:{http_port}/healthz") == 200
    process.send_signal(signal.SIGTERM)
    (stop_timeout,) = unit_directives()["TimeoutStopSec"]
    output = process.communicate(timeout=int(stop_timeout))[0]
    assert process.returncode == 0, output
    assert '"stopped"' in output


def test_dockerfile_healthcheck_passes_against_a_running_service(
    served_example: tuple[subprocess.Popen[str], int],
) -> None:
    _, http_port = served_example
    argv = healthcheck_command()
    url = healthcheck_url()
    argv[2] = argv[2].replace(url, f"http://127.0.0.1:{http_port}/healthz")

    def healthcheck() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *argv[1:]],
            capture_output=True,
            text=True,
            env=clean_environ(),
            timeout=30,
            check=False,
        )

    result = healthcheck()
    assert result.returncode == 0, result.stderr
    argv[2] = argv[2].replace("/healthz", "/missing")
    assert healthcheck().returncode != 0


# --- example config -------------------------------------------------------------------------------


def test_example_config_passes_check_config() -> None:
    result = check_config(EXAMPLE_CONFIG)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configuration OK"


def test_example_config_names_every_setting() -> None:
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    for setting in dataclasses.fields(Settings):
        pattern = rf"^(# )?({setting.name} = |\[\[{setting.name}\]\]$)"
        assert re.search(pattern, text, re.MULTILINE), setting.name


def test_example_config_commented_settings_load_when_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    uncommented = re.sub(r"^# ([a-z_]+ = |\[\[)", r"\1", text, flags=re.MULTILINE)
    path = tmp_path / "relayprobe.toml"
    path.write_text(uncommented.replace("proxy_protocol = false", "proxy_protocol = true"))
    settings = load_file(path)
    assert settings.proxy_protocol
    assert settings.trusted_proxy
    assert len(settings.probes) == 1


def test_example_config_uses_documentation_networks() -> None:
    settings = load_file(EXAMPLE_CONFIG)
    for text in settings.allow + settings.deny:
        network = ipaddress.ip_network(text)
        if isinstance(network, ipaddress.IPv4Network):
            assert network.subnet_of(ipaddress.IPv4Network("192.0.2.0/24")), text
        else:
            assert network.subnet_of(ipaddress.IPv6Network("2001:db8::/32")), text


# --- container image ------------------------------------------------------------------------------


def test_dockerfile_instructions_are_known() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    for keyword, arguments in instructions:
        assert keyword in DOCKERFILE_INSTRUCTIONS, keyword
        assert arguments, keyword


def test_dockerfile_base_is_a_pinned_python_311_slim() -> None:
    for base in dockerfile_values("FROM"):
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base)


def test_dockerfile_runs_as_a_numeric_non_root_user() -> None:
    assert dockerfile_uid() != 0
    for path in (K8S_DEPLOYMENT, K8S_REPLICAS):
        assert k8s_template(path)["spec"]["securityContext"]["runAsUser"] == dockerfile_uid()


def test_dockerfile_copies_only_what_exists() -> None:
    build = compose_service()["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    copies = dockerfile_values("COPY") + dockerfile_values("ADD")
    assert copies
    for arguments in copies:
        parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
        for source in parts[:-1]:
            assert (context / source).exists(), source


def test_dockerfile_variables_are_relayprobe_settings() -> None:
    known = {env_name(setting.name) for setting in dataclasses.fields(Settings)}
    for name in dockerfile_env():
        if name.startswith("RELAYPROBE_"):
            assert name in known | {env_name("config")}, name


def test_dockerfile_ports_volume_and_healthcheck_match_compose() -> None:
    settings = compose_settings()
    assert settings.sink_listen is not None
    assert settings.http_listen is not None
    listen_ports = {endpoint.port for endpoint in settings.listen}
    web_ports = {endpoint.port for endpoint in settings.web_listen}
    served = listen_ports | web_ports | {settings.sink_listen.port, settings.http_listen.port}
    assert dockerfile_exposed() == served
    assert min(served) >= 1024  # no capability needed in the container
    published = {}
    for mapping in compose_service()["ports"]:
        *_, host, container = str(mapping).split(":")
        published[int(host)] = int(container)
    assert set(published.values()) == served
    assert published[23] in listen_ports
    assert published[25] == settings.sink_listen.port
    assert published[80] in web_ports
    assert healthcheck_url() == f"http://127.0.0.1:{settings.http_listen.port}/healthz"
    assert dockerfile_values("VOLUME") == [json.dumps([settings.state_dir])]


def test_compose_mounts_and_volumes_exist() -> None:
    (document,) = load_yaml(COMPOSE)
    service = compose_service()
    assert "ALL" in service["cap_drop"]
    assert service["read_only"] is True
    for volume in service["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE.parent / source).is_file(), source
        else:
            assert source in document["volumes"], source


# --- HAProxy --------------------------------------------------------------------------------------


def haproxy_sections(path: Path = HAPROXY_CONFIG) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not raw.startswith((" ", "\t")):
            lines = sections.setdefault(line, [])
        else:
            lines.append(line)
    return sections


@pytest.mark.parametrize("path", [HAPROXY_CONFIG, REPLICAS_HAPROXY], ids=["single", "replicas"])
def test_haproxy_config_is_valid(path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        skip_or_fail("Debian's haproxy is not installed (run .ci/system-packages as root)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output, output


def haproxy_servers(sections: dict[str, list[str]], port: int) -> list[str]:
    """The server lines of the backend behind the frontend bound to `port`; none if no frontend
    binds it."""
    frontends = [lines for lines in sections.values() if f"bind :{port}" in lines]
    if not frontends:
        return []
    (frontend,) = frontends
    (backend,) = [line.split()[1] for line in frontend if line.startswith("default_backend")]
    return [line for line in sections[f"backend {backend}"] if line.startswith("server ")]


def test_haproxy_sends_proxy_protocol_to_telnet_and_web_and_leaves_the_sink_out() -> None:
    sections = haproxy_sections()
    assert "mode tcp" in sections["defaults"]

    telnet_servers = haproxy_servers(sections, 23)
    assert telnet_servers
    assert all("send-proxy-v2" in server.split() for server in telnet_servers)
    assert all("send-proxy-v2" in server.split() for server in haproxy_servers(sections, 80))
    # The sink takes no PROXY header: behind HAProxy every relay would share one address.
    assert not haproxy_servers(sections, 25)
    http_port = load_file(EXAMPLE_CONFIG).http_listen
    assert http_port is not None
    assert all(f"port {http_port.port}" in server for server in telnet_servers)


# --- Kubernetes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kinds"),
    [
        (K8S_DEPLOYMENT, ["apps/v1 Deployment", "v1 PersistentVolumeClaim"]),
        (K8S_SERVICE, ["v1 Service", "v1 Service"]),
        (K8S_CONFIGMAP, ["v1 ConfigMap"]),
        (K8S_REPLICAS, ["apps/v1 Deployment", "policy/v1 PodDisruptionBudget"]),
        (K8S_REDIS, ["apps/v1 Deployment", "v1 Service"]),
        (K8S_POSTGRES, ["apps/v1 StatefulSet", "v1 Service"]),
    ],
)
def test_kubernetes_documents_have_the_expected_kinds(path: Path, kinds: list[str]) -> None:
    documents = load_yaml(path)
    assert [f"{document['apiVersion']} {document['kind']}" for document in documents] == kinds
    for document in documents:
        assert document["metadata"]["name"].startswith("relayprobe")


def test_kubernetes_config_passes_check_config(tmp_path: Path) -> None:
    path = tmp_path / "relayprobe.toml"
    path.write_text(k8s_config_text(), encoding="utf-8")
    result = check_config(path)
    assert result.returncode == 0, result.stderr


def test_kubernetes_deployment_matches_its_config(tmp_path: Path) -> None:
    deployment, claim = load_yaml(K8S_DEPLOYMENT)
    (configmap,) = load_yaml(K8S_CONFIGMAP)
    settings = k8s_settings(tmp_path)
    spec = deployment["spec"]
    assert spec["replicas"] == 1  # one sink: see the comment in deployment.yaml
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    container = k8s_container()
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}

    config_arg = container["args"][container["args"].index("--config") + 1]
    config_dir, _, config_key = config_arg.rpartition("/")
    assert volumes[mounts[config_dir]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_key in configmap["data"]
    state = volumes[mounts[settings.state_dir]]
    assert state["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    assert settings.sink_listen is not None
    assert settings.http_listen is not None
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert {endpoint.port for endpoint in settings.listen} == {ports["telnet"]}
    assert ports["sink"] == settings.sink_listen.port
    assert ports["http"] == settings.http_listen.port
    assert {endpoint.port for endpoint in settings.web_listen} == {ports["web"]}
    assert set(ports.values()) == dockerfile_exposed()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"requests", "limits"} <= container["resources"].keys()


@pytest.mark.parametrize(
    ("path", "writable"),
    [
        (K8S_DEPLOYMENT, {"/tmp"}),
        (K8S_REPLICAS, {"/tmp"}),
        (K8S_REDIS, set()),
        (K8S_POSTGRES, {"/tmp", "/var/run/postgresql"}),
    ],
)
def test_kubernetes_pod_runs_unprivileged(path: Path, writable: set[str]) -> None:
    pod = k8s_template(path)["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = k8s_container(path)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounted = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
    assert writable <= mounted  # despite the read-only root


def test_kubernetes_service_keeps_the_caller_address() -> None:
    public, metrics = load_yaml(K8S_SERVICE)
    template = k8s_template()
    container_ports = {port["name"] for port in k8s_container()["ports"]}
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["spec"]["externalTrafficPolicy"] == "Local"
    targets = {port["port"]: port["targetPort"] for port in public["spec"]["ports"]}
    assert targets == {23: "telnet", 80: "web", 25: "sink"}
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [port["targetPort"] for port in metrics["spec"]["ports"]] == ["http"]
    for service in (public, metrics):
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports


# --- Several replicas: Kubernetes (kubernetes/replicas, kubernetes/shared) ------------------------

SHARED_SECRET = "relayprobe-shared"
# Where Redis and PostgreSQL listen: neither deployment changes its server's default.
SERVER_PORTS = {"redis_url": 6379, "database_url": 5432}


def shared_env() -> dict[str, str]:
    """shared.env.example as `kubectl create secret generic --from-env-file` reads it: KEY=VALUE
    lines, each value as it is; blank lines and `#` lines skipped."""
    variables: dict[str, str] = {}
    for raw in K8S_SHARED_ENV.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        name, sep, value = raw.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), raw
        assert name not in variables, name
        variables[name] = value
    return variables


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_kubernetes_replicas_take_the_shared_urls_from_the_secret(tmp_path: Path) -> None:
    deployment, _ = load_yaml(K8S_REPLICAS)
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    container = k8s_container(K8S_REPLICAS)
    assert container["envFrom"] == [{"secretRef": {"name": SHARED_SECRET, "optional": False}}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    secret = shared_env()
    shared = {env_name("redis_url"), env_name("database_url")}
    assert {name for name in secret if name.startswith("RELAYPROBE_")} == shared
    # envFrom hands the pod every variable of the Secret; relayprobe refuses unknown RELAYPROBE_*.
    settings = k8s_settings(tmp_path, environ=secret)
    assert settings.redis_url == secret[env_name("redis_url")]
    assert settings.database_url == secret[env_name("database_url")]
    # A ReadWriteOnce claim can't follow two pods onto two nodes: no replica keeps its own state.
    pod = spec["template"]["spec"]
    assert not [volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
    assert settings.state_dir not in {mount["mountPath"] for mount in container["volumeMounts"]}


def test_kubernetes_replicas_pod_is_the_single_pod_but_for_shared_state_and_stopping() -> None:
    single, replicas = k8s_template(K8S_DEPLOYMENT), k8s_template(K8S_REPLICAS)
    single_pod, replica_pod = single["spec"], replicas["spec"]
    (single_container,), (replica_container,) = single_pod["containers"], replica_pod["containers"]
    claimed = {
        volume["name"] for volume in single_pod["volumes"] if "persistentVolumeClaim" in volume
    }
    assert claimed
    single_pod["volumes"] = [v for v in single_pod["volumes"] if v["name"] not in claimed]
    single_container["volumeMounts"] = [
        mount for mount in single_container["volumeMounts"] if mount["name"] not in claimed
    ]
    del replica_container["envFrom"]
    del replica_pod["topologySpreadConstraints"]
    pause = replica_container.pop("lifecycle")["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    # The pause before SIGTERM comes on top of the time relayprobe's own stop has.
    replica_grace = replica_pod.pop("terminationGracePeriodSeconds")
    assert replica_grace >= int(pause[1]) + single_pod.pop("terminationGracePeriodSeconds")
    assert replicas == single


def test_kubernetes_selectors_tell_relayprobe_from_its_shared_servers() -> None:
    deployment, budget = load_yaml(K8S_REPLICAS)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert budget["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    servers = [load_yaml(K8S_REDIS), load_yaml(K8S_POSTGRES)]
    server_labels = [workload["spec"]["template"]["metadata"]["labels"] for workload, _ in servers]
    relayprobe_selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        budget["spec"]["selector"]["matchLabels"],
        spread["labelSelector"]["matchLabels"],
        *(service["spec"]["selector"] for service in load_yaml(K8S_SERVICE)),
    ]
    for selector in relayprobe_selectors:
        assert selects(selector, labels), selector
        assert not any(selects(selector, other) for other in server_labels), selector
    for (workload, service), own in zip(servers, server_labels, strict=True):
        for selector in (workload["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
            assert selects(selector, own), selector
            assert not selects(selector, labels), selector


@pytest.mark.parametrize(
    ("path", "setting", "password"),
    [
        (K8S_REDIS, "redis_url", "REDIS_PASSWORD"),
        (K8S_POSTGRES, "database_url", "POSTGRES_PASSWORD"),
    ],
)
def test_kubernetes_shared_servers_are_where_the_secret_points(
    path: Path, setting: str, password: str
) -> None:
    server_port = SERVER_PORTS[setting]
    _, service = load_yaml(path)
    secret = shared_env()
    url = urllib.parse.urlsplit(secret[env_name(setting)])
    assert url.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    container = k8s_container(path)
    container_ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    assert container_ports[port["targetPort"]] == server_port
    variables = {variable["name"]: variable for variable in container["env"]}
    reference = variables[password]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": SHARED_SECRET, "key": password}
    assert url.password == secret[password]
    assert "CHANGE-ME" in secret[password]  # a placeholder, and plainly one


def test_kubernetes_postgres_matches_the_database_url_and_keeps_its_data() -> None:
    statefulset, service = load_yaml(K8S_POSTGRES)
    url = urllib.parse.urlsplit(shared_env()[env_name("database_url")])
    spec = statefulset["spec"]
    assert spec["serviceName"] == service["metadata"]["name"]
    container = k8s_container(K8S_POSTGRES)
    values = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert values["POSTGRES_USER"] == url.username
    assert values["POSTGRES_DB"] == url.path.removeprefix("/")
    (claim,) = spec["volumeClaimTemplates"]
    (data,) = [
        mount["mountPath"]
        for mount in container["volumeMounts"]
        if mount["name"] == claim["metadata"]["name"]
    ]
    # Below the claim's root, which may hold lost+found; and on the claim.
    assert Path(values["PGDATA"]).parent == Path(data)


# --- Several replicas: compose (deploy/replicas) --------------------------------------------------


def replicas_compose(env_file: dict[str, str]) -> dict[str, Any]:
    """deploy/replicas/compose.yaml as Compose reads it with `env_file` as its .env: ${VAR},
    ${VAR:?message} and $VAR interpolated (a missing one is a KeyError), $$ a literal $."""

    def interpolate(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env_file[match.group("braced") or match.group("bare")]

    text = re.sub(
        r"\$\$|\$\{(?P<braced>\w+)(?::\?[^}]*)?\}|\$(?P<bare>\w+)",
        interpolate,
        REPLICAS_COMPOSE.read_text(encoding="utf-8"),
    )
    (document,) = yaml.safe_load_all(text)
    assert isinstance(document, dict)
    return document


@pytest.fixture
def compose_env() -> dict[str, str]:
    return {"REDIS_PASSWORD": secrets.token_hex(16), "POSTGRES_PASSWORD": secrets.token_hex(16)}


def test_compose_replicas_share_redis_and_postgres_behind_haproxy(
    compose_env: dict[str, str],
) -> None:
    services = replicas_compose(compose_env)["services"]
    replicas = {name: spec for name, spec in services.items() if name.startswith("relayprobe-")}
    assert len(replicas) >= 2
    haproxy_address = services["haproxy"]["networks"]["relayprobe"]["ipv4_address"]
    sections = haproxy_sections(REPLICAS_HAPROXY)
    telnet, web = haproxy_servers(sections, 23), haproxy_servers(sections, 80)
    assert len(telnet) == len(web) == len(replicas)
    # The sink is not behind HAProxy (compose.yaml says why): one replica publishes it.
    assert haproxy_servers(sections, 25) == []
    sink_publishers = []
    for name, service in replicas.items():
        mounts = {
            target: source for source, target, *_ in (v.split(":") for v in service["volumes"])
        }
        environ = {key: str(value) for key, value in service["environment"].items()}
        config = REPLICAS_COMPOSE.parent / mounts[dockerfile_env()[env_name("config")]]
        settings = load_file(config, environ=environ)
        assert settings.proxy_protocol
        assert settings.trusted_proxy == (f"{haproxy_address}/32",)
        assert settings.redis_url is not None and settings.database_url is not None
        redis_url = urllib.parse.urlsplit(settings.redis_url)
        assert redis_url.port == SERVER_PORTS["redis_url"]
        redis_service = services[str(redis_url.hostname)]
        assert redis_url.password == redis_service["environment"]["REDIS_PASSWORD"]
        database_url = urllib.parse.urlsplit(settings.database_url)
        assert database_url.port == SERVER_PORTS["database_url"]
        postgres = services[str(database_url.hostname)]["environment"]
        assert database_url.username == postgres["POSTGRES_USER"]
        assert database_url.password == postgres["POSTGRES_PASSWORD"]
        assert database_url.path.removeprefix("/") == postgres["POSTGRES_DB"]
        for dependency, condition in service["depends_on"].items():
            assert condition == {"condition": "service_healthy"}
            assert "healthcheck" in services[dependency], dependency

        address = service["networks"]["relayprobe"]["ipv4_address"]
        assert settings.http_listen is not None
        for servers, endpoints in ((telnet, settings.listen), (web, settings.web_listen)):
            targets = {f"{address}:{endpoint.port}" for endpoint in endpoints}
            (server,) = [line for line in servers if line.split()[2] in targets]
            assert "send-proxy-v2" in server.split(), server
        (checked,) = [line for line in telnet if line.split()[2].startswith(f"{address}:")]
        assert f"check port {settings.http_listen.port}" in checked
        published = dict(str(mapping).split(":")[-2:] for mapping in service.get("ports", []))
        if "25" in published:
            assert settings.sink_listen is not None
            assert published["25"] == str(settings.sink_listen.port)
            sink_publishers.append(name)
    assert len(sink_publishers) == 1


def test_compose_haproxy_may_bind_the_ports_it_publishes(compose_env: dict[str, str]) -> None:
    haproxy = replicas_compose(compose_env)["services"]["haproxy"]
    binds = {
        int(line.split(":")[-1])
        for lines in haproxy_sections(REPLICAS_HAPROXY).values()
        for line in lines
        if line.startswith("bind ")
    }
    published = {int(str(mapping).split(":")[-1]) for mapping in haproxy["ports"]}
    assert published == binds
    # The image runs HAProxy unprivileged.
    if min(binds) < 1024:
        assert haproxy["sysctls"]["net.ipv4.ip_unprivileged_port_start"] <= min(binds)


# --- Several replicas: the Redis servers' command, run here ---------------------------------------


# redis-py retries a refused AUTH, with back-off, like a lost connection.
NO_RETRY = Retry(NoBackoff(), 0)


@contextlib.contextmanager
def redis_from_script(script: str, password: str, directory: Path) -> Iterator[int]:
    """The shell script of a Redis container, run on a free loopback port; yields the port."""
    if (reason := redis_available()) is not None:
        skip_or_fail(reason)
    start = "exec redis-server - "
    assert script.count(start) == 1, script
    port = free_port()
    # Redis rewrites its process title: without that, /proc shows the arguments as `ps` does.
    script = script.replace(start, f"{start}--port {port} --bind 127.0.0.1 --set-proc-title no ")
    process = subprocess.Popen(
        ["sh", "-c", script],
        cwd=directory,
        env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"the script exited with {process.returncode}"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "Redis did not listen within 15 s"
            time.sleep(0.05)
        # exec: Redis itself is the container's first process, and gets its SIGTERM.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline
        assert password.encode() not in cmdline  # `ps` never shows it
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def redis_scripts(compose_env: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """(script, REDIS_PASSWORD, the replicas' RELAYPROBE_REDIS_URL) of each Redis in deploy/."""
    secret = shared_env()
    k8s_command = k8s_container(K8S_REDIS)["command"]
    services = replicas_compose(compose_env)["services"]
    compose_command = services["redis"]["command"]
    assert k8s_command[:2] == compose_command[:2] == ["sh", "-c"]
    return {
        "kubernetes": (k8s_command[2], secret["REDIS_PASSWORD"], secret[env_name("redis_url")]),
        "compose": (
            compose_command[2],
            services["redis"]["environment"]["REDIS_PASSWORD"],
            services["relayprobe-a"]["environment"][env_name("redis_url")],
        ),
    }


@pytest.mark.parametrize("deployment", ["kubernetes", "compose"])
def test_redis_requires_the_password_of_the_replicas_url(
    deployment: str, compose_env: dict[str, str], tmp_path: Path
) -> None:
    script, password, url = redis_scripts(compose_env)[deployment]
    with redis_from_script(script, password, tmp_path) as port:
        userinfo = urllib.parse.urlsplit(url).netloc.rpartition("@")[0]
        here = urllib.parse.urlsplit(url)._replace(netloc=f"{userinfo}@127.0.0.1:{port}")
        with redis.Redis.from_url(here.geturl(), socket_timeout=5) as client:
            assert client.ping()
        with (
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, retry=NO_RETRY) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()


def test_compose_redis_healthcheck_passes_only_when_redis_answers_it(
    compose_env: dict[str, str], tmp_path: Path
) -> None:
    redis_service = replicas_compose(compose_env)["services"]["redis"]
    kind, check = redis_service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"

    def healthcheck(port: int, environment: dict[str, str]) -> int:
        return subprocess.run(
            ["sh", "-c", check.replace("redis-cli", f"redis-cli -p {port}")],
            env={"PATH": os.environ["PATH"], **environment},
            capture_output=True,
            timeout=30,
            check=False,
        ).returncode

    environment = redis_service["environment"]
    script, password, _ = redis_scripts(compose_env)["compose"]
    with redis_from_script(script, password, tmp_path) as port:
        assert healthcheck(port, environment) == 0
        # Redis refuses a client without the password: that is no answer (NOAUTH, exit 0).
        assert healthcheck(port, {}) != 0
    assert healthcheck(port, environment) != 0
