"""The deployment files in deploy/ run commands that exist, with flags that exist.

Every `outbox ...` invocation in the compose file, the systemd units and the
Kubernetes manifests is resolved through the click group of `outbox.cli` (whose
lazy commands load the relay's, the consumer's and the notification service's),
and its options are checked against that command's. Health checks must probe
`/healthz` on the port the command serves its metrics on, and stop timeouts must
leave room for the default shutdown timeout.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest

from consumer import ConsumerConfig
from consumer.notify.config import NotifyConfig, load_config
from outbox.cli import cli
from outbox.durations import parse_duration
from outbox.rabbitmq import RabbitMQBroker
from outbox.receipts import receipts_exchange, receipts_queue
from relay import RelayConfig

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("PyYAML is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METRICS_ENV = "OUTBOX_METRICS_PORT"
# Every daemon stops within its shutdown timeout; a supervisor must wait longer than that.
SHUTDOWN_TIMEOUT = max(
    RelayConfig.__dataclass_fields__["shutdown_timeout"].default,
    ConsumerConfig.__dataclass_fields__["shutdown_timeout"].default,
    NotifyConfig.__dataclass_fields__["shutdown_timeout"].default,
)


# --- resolving a command line through the `outbox` click group -------------------------------


def resolve(argv: list[str]) -> tuple[click.Command, list[str], str]:
    """Return the command ``argv`` (``outbox ...``) runs, its own arguments and its path.

    A group's options are checked on the way; a group that runs by itself
    (``outbox notify --config FILE``) is the command when no subcommand follows.
    """
    assert Path(argv[0]).name == "outbox", argv
    ctx = click.Context(cli, info_name="outbox")
    command: click.Command = cli
    args = list(argv[1:])
    path = "outbox"
    while isinstance(command, click.Group):
        taken = 0
        while taken < len(args) and args[taken].startswith("-"):
            opt = option(command, args[taken].partition("=")[0])
            needs_value = opt is not None and not opt.is_flag and "=" not in args[taken]
            taken += 2 if needs_value else 1
        if taken >= len(args) and command.invoke_without_command:
            return command, args, path
        check_options(command, args[:taken], path, env=None)
        assert taken < len(args), f"`{path}` needs a subcommand"
        name = args[taken]
        args = args[taken + 1 :]
        sub = command.get_command(ctx, name)
        assert sub is not None, (
            f"`{path}` has no command {name!r}; it has {command.list_commands(ctx)}"
        )
        command, path = sub, f"{path} {name}"
    return command, args, path


def option(command: click.Command, flag: str) -> click.Option | None:
    return next(
        (
            p
            for p in command.params
            if isinstance(p, click.Option) and flag in (*p.opts, *p.secondary_opts)
        ),
        None,
    )


def expanded(value: str) -> bool:
    """False for a value a shell, systemd or compose fills in later (``$X``, ``${X}``)."""
    return "$" not in value


def check_value(param: click.Parameter, value: str, where: str) -> None:
    # A file the command reads at start exists only where it is deployed.
    if expanded(value) and not isinstance(param.type, click.Path):
        try:
            param.type.convert(value, param, None)
        except click.BadParameter as e:
            pytest.fail(f"{where}: {value!r} is not a valid {param.name}: {e.message}")


def check_options(
    command: click.Command, args: list[str], path: str, env: dict[str, str] | None
) -> dict[str, str]:
    """Check ``args`` against ``command``'s parameters; return the options given, by name.

    With ``env`` (the service's environment, when the file states all of it), every
    required option must come from ``args`` or from its environment variable there,
    and every ``OUTBOX_*`` variable there must be valid for the option that reads it.
    """
    given: dict[str, str] = {}
    positional: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("-"):
            positional.append(token)
            continue
        flag, has_value, value = token.partition("=")
        opt = option(command, flag)
        assert opt is not None, f"`{path}` has no option {flag}"
        if not opt.is_flag and not has_value:
            assert tokens, f"`{path} {flag}` needs a value"
            value = tokens.pop(0)
        assert opt.name is not None
        check_value(opt, value, f"`{path} {flag}`")
        given[opt.name] = value
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    unlimited = any(a.nargs == -1 for a in arguments)
    assert unlimited or len(positional) <= len(arguments), (
        f"`{path}` takes {len(arguments)} argument(s), got {positional}"
    )
    for argument in arguments[len(positional) :]:
        assert not argument.required, f"`{path}` needs its {argument.name.upper()} argument"  # type: ignore[union-attr]
    if env is not None:
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            envvars = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
            for name in envvars:
                if name in env:
                    check_value(param, env[name], f"{name} for `{path}`")
            if param.required and param.name not in given:
                assert any(name in env for name in envvars), (
                    f"`{path}` needs {param.opts[0]} or {' / '.join(envvars)}"
                )
        unknown = {
            name
            for name in env
            if name.startswith("OUTBOX_") and not any(name in envvars_of(p) for p in all_options())
        }
        assert not unknown, f"no `outbox` option reads {sorted(unknown)} (`{path}`)"
    return given


def envvars_of(param: click.Parameter) -> list[str]:
    envvar = getattr(param, "envvar", None)
    return [envvar] if isinstance(envvar, str) else list(envvar or [])


def all_options() -> list[click.Parameter]:
    """Every parameter of every `outbox` command, the lazy ones included."""
    found: list[click.Parameter] = []
    ctx = click.Context(cli, info_name="outbox")

    def walk(command: click.Command) -> None:
        found.extend(command.params)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None:
                    walk(sub)

    walk(cli)
    return found


def metrics_port(command: click.Command, given: dict[str, str], env: dict[str, str]) -> int:
    """The port ``command`` serves /metrics and /healthz on, from its flag or its variable."""
    opt = option(command, "--metrics-port")
    assert opt is not None, "the command has no --metrics-port"
    if "metrics_port" in given:
        return int(given["metrics_port"])
    assert METRICS_ENV in envvars_of(opt), f"--metrics-port does not read {METRICS_ENV}"
    assert METRICS_ENV in env, f"neither --metrics-port nor {METRICS_ENV} is set"
    return int(env[METRICS_ENV])


def outbox_invocations(command: str | list[str]) -> list[list[str]]:
    """The `outbox ...` command lines in a container command (``sh -c`` scripts included)."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"]):
        lines = []
        for part in re.split(r"&&|\|\||;", argv[2]):
            words = shlex.split(part)
            if words and words[0] == "exec":
                words = words[1:]
            lines.append(words)
    else:
        lines = [argv]
    return [words for words in lines if words and Path(words[0]).name == "outbox"]


# --- docker compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def test_every_compose_command_is_a_real_outbox_command_with_its_settings() -> None:
    commanded = {name: s for name, s in compose_services().items() if "command" in s}
    assert {"migrate", "relay", "billing", "notify"} <= set(commanded)
    for name, service in commanded.items():
        invocations = outbox_invocations(service["command"])
        assert invocations, f"service {name} runs no `outbox` command"
        for argv in invocations:
            command, args, path = resolve(argv)
            check_options(command, args, f"{name}: {path}", environment(service))


def test_compose_health_checks_probe_healthz_on_the_metrics_port() -> None:
    for name, service in compose_services().items():
        if "command" not in service:
            continue
        command, args, path = resolve(outbox_invocations(service["command"])[-1])
        if option(command, "--metrics-port") is None:
            assert "healthcheck" not in service, f"{name}: `{path}` serves no /healthz"
            continue
        env = environment(service)
        port = metrics_port(command, check_options(command, args, path, env), env)
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/healthz" in probe, f"{name} probes {probe}, not port {port}"


def test_compose_daemons_get_longer_to_stop_than_their_shutdown_timeout() -> None:
    for name, service in compose_services().items():
        if "command" not in service:
            continue
        _, _, path = resolve(outbox_invocations(service["command"])[-1])
        if path in ("outbox relay", "outbox consume", "outbox notify"):
            grace = parse_duration(service.get("stop_grace_period", "10s"))
            assert grace > SHUTDOWN_TIMEOUT, f"{name}: stop_grace_period {grace}"


def test_compose_files_and_build_inputs_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            dockerfile = context / service["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name} builds from missing {dockerfile}"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"{dockerfile}: no {source}"


# --- notify.toml ------------------------------------------------------------------------------


def interpolated(env: dict[str, str]) -> dict[str, str]:
    """The environment as compose passes it when the shell sets none of the variables."""
    default = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}")
    return {name: default.sub(lambda m: m.group(1), value) for name, value in env.items()}


def test_notify_config_loads_with_the_compose_services_environment() -> None:
    service = compose_services()["notify"]
    env = interpolated(environment(service))
    # The service's own loader: every key, duration, secret and token is checked.
    config = load_config(DEPLOY / "notify" / "notify.toml", environ=env)
    assert config.subscriptions
    assert any(p.split(":")[-1] == str(config.api_port) for p in service["ports"])
    assert config.api_host == "0.0.0.0", "a container's API must listen on every interface"
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_AMQP_URL"} <= set(env)
    volumes = [v.split(":") for v in service["volumes"]]
    [target] = [v[1] for v in volumes if v[0].endswith("notify.toml")]
    _, args, _ = resolve(outbox_invocations(service["command"])[-1])
    assert args[args.index("--config") + 1] == target


# --- systemd ----------------------------------------------------------------------------------


def units() -> list[Path]:
    found = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {p.name for p in found} >= {
        "outbox-relay.service",
        "outbox-consumer@.service",
        "outbox-notify.service",
    }
    return found


def directives(unit: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


@pytest.mark.parametrize("unit", units(), ids=lambda p: p.name)
def test_systemd_units_run_real_outbox_commands_and_wait_for_a_clean_stop(unit: Path) -> None:
    settings = directives(unit)
    execs = [v for k, v in settings if k.startswith("Exec")]
    assert any(k == "ExecStart" for k, _ in settings), f"{unit.name} has no ExecStart"
    daemon = ""
    for line in execs:
        argv = shlex.split(line.lstrip("-@+!:"))
        command, args, path = resolve(argv)
        check_options(command, args, f"{unit.name}: {path}", env=None)
        if line == dict(settings)["ExecStart"]:
            daemon = path
    assert dict(settings).get("EnvironmentFile", "").startswith("/etc/outbox/")
    assert dict(settings).get("KillSignal") == "SIGTERM"
    if daemon in ("outbox relay", "outbox consume", "outbox notify"):
        timeout = dict(settings)["TimeoutStopSec"]
        # systemd reads a bare number as seconds.
        stop = timedelta(seconds=int(timeout)) if timeout.isdigit() else parse_duration(timeout)
        assert stop > SHUTDOWN_TIMEOUT, f"{unit.name}: TimeoutStopSec={timeout}"


# --- Kubernetes -------------------------------------------------------------------------------


def manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    names = {name for name, _ in docs}
    assert {"relay.yaml", "consumer.yaml", "notify.yaml"} <= names
    return docs


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def test_kubernetes_containers_run_real_commands_and_probe_healthz_on_the_metrics_port() -> None:
    deployments = [(f, d) for f, d in manifests() if d["kind"] == "Deployment"]
    assert len(deployments) >= 3
    for file, deployment in deployments:
        pod = deployment["spec"]["template"]
        assert (
            deployment["spec"]["selector"]["matchLabels"].items()
            <= pod["metadata"]["labels"].items()
        ), f"{file}: the selector does not select its own pods"
        spec = pod["spec"]
        for container in spec.get("initContainers", []):
            if Path(container["command"][0]).name == "outbox":
                command, args, path = resolve(container["command"] + container.get("args", []))
                check_options(command, args, f"{file}: {path}", env=None)
        for container in spec["containers"]:
            where = f"{file}: container {container['name']}"
            command, args, path = resolve(container["command"] + container.get("args", []))
            given = check_options(command, args, f"{where}: {path}", env=None)
            port = metrics_port(command, given, container_env(container))
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] == "/healthz", f"{where}: {probe} on {get['path']}"
                assert ports.get(get["port"], get["port"]) == port, f"{where}: {probe} port"
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
            assert timedelta(seconds=spec["terminationGracePeriodSeconds"]) > SHUTDOWN_TIMEOUT


def test_kubernetes_notify_config_is_the_deployed_notify_toml() -> None:
    [config_map] = [d for f, d in manifests() if f == "notify.yaml" and d["kind"] == "ConfigMap"]
    expected = tomllib.loads((DEPLOY / "notify" / "notify.toml").read_text())
    assert tomllib.loads(config_map["data"]["notify.toml"]) == expected
    [deployment] = [d for f, d in manifests() if f == "notify.yaml" and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["api"] == expected["api_port"]
    [service] = [d for f, d in manifests() if f == "notify.yaml" and d["kind"] == "Service"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


# --- RabbitMQ definitions ---------------------------------------------------------------------


def test_rabbitmq_definitions_declare_what_the_relay_and_consumers_use() -> None:
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    exchanges = {e["name"]: e for e in definitions["exchanges"]}
    for name in ("outbox", receipts_exchange("outbox")):
        assert exchanges[name]["type"] == "topic", name
        assert exchanges[name]["durable"] is True, name
        assert exchanges[name]["auto_delete"] is False, name
    # The relay declares the receipts queue with the broker's queue type: a queue that
    # exists with other arguments would make that declaration fail.
    queue_type = inspect.signature(RabbitMQBroker).parameters["queue_type"].default
    queues = {q["name"]: q for q in definitions.get("queues", [])}
    receipts = queues[receipts_queue("outbox")]
    assert receipts["durable"] is True
    assert receipts["arguments"] == {"x-queue-type": queue_type}
    assert {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]} >= {
        (receipts_exchange("outbox"), receipts_queue("outbox"), "#")
    }
    vhosts = {v["name"] for v in definitions["vhosts"]}
    for item in [*definitions["exchanges"], *queues.values(), *definitions["bindings"]]:
        assert item["vhost"] in vhosts
