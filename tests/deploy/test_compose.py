"""The deployment (Dockerfile, docker-compose.yaml, deploy/) is coherent with itself and with the repo.

Docker cannot run where this suite runs, so these tests read the files the way ``docker compose``
and ``docker build`` would and look for what would break a ``docker compose up`` first: a missing
service, a wrong Airflow subcommand, a mount of a path the repo lacks, a file a build step or a
command needs that does not exist, executor settings that do not fit together, connections that
point nowhere, an image whose Airflow or Python differs from the pins.

Each check is a function returning the problems it finds (empty when all is well); the tests run
them on the repository, and ``TestChecksCatchBreakage`` runs them on deliberately broken copies.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from growthhub_sync.config import ShardsConfig

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parents[2]

AIRFLOW_SUBCOMMANDS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-worker": ["celery", "worker"],
    "airflow-triggerer": ["triggerer"],
}
"""The long-running Airflow services and the ``airflow`` subcommand each must run."""

AIRFLOW_SERVICES = [*AIRFLOW_SUBCOMMANDS, "airflow-init"]
EXPECTED_SERVICES = [
    "postgres",
    "redis",
    *AIRFLOW_SERVICES,
    "warehouse",
    "warehouse-seed",
    "growthhub-sandbox",
]
CONNECTIONS = [
    "AIRFLOW_CONN_GROWTHHUB_DEFAULT",
    "AIRFLOW_CONN_WAREHOUSE_DEFAULT",
    "AIRFLOW_CONN_GROWTHHUB_COORDINATION",
]

RUNTIME_DIRS = {"logs", "var"}
"""Mounted folders that are not in the repo: gitignored, created on the host by Docker (as root) and
handed to the Airflow user by airflow-init, as in Airflow's official compose file."""

_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Resolve compose's ``${VAR:-default}`` as ``docker compose`` does with none of the variables set."""

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("op") in (":-", "-"):
            return match.group("default") or ""
        return ""

    return _INTERPOLATION.sub(resolve, value)


def argv(value: str | list[str] | None) -> list[str]:
    """A compose ``command``/``entrypoint`` as an argument list (strings are split like a shell)."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` as {service: condition}, whichever of its two forms the file uses."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def option(args: list[str], flag: str) -> str | None:
    """The value after ``flag`` in an argument list (``--flag value`` or ``--flag=value``)."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@dataclass(frozen=True)
class Mount:
    host: str  # relative to the project root, normalised ("dags", "deploy/sandbox.yaml")
    container: PurePosixPath


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


class Deployment:
    """The deployment files of one checkout, read as ``docker compose`` and ``docker build`` read them."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @cached_property
    def compose(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "docker-compose.yaml").read_text())

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.compose.get("services") or {}

    def env(self, service: str) -> dict[str, str]:
        return environment(self.services[service])

    def mounts(self, service: str) -> list[Mount]:
        """The service's bind mounts (named volumes are left out)."""
        mounts = []
        named = set(self.compose.get("volumes") or {})
        for item in self.services[service].get("volumes") or []:
            if isinstance(item, dict):
                if item.get("type") != "bind":
                    continue
                source, target = item["source"], item["target"]
            else:
                source, target = interpolate(item).split(":")[:2]
            if source in named:
                continue
            mounts.append(Mount(PurePosixPath(interpolate(source)).as_posix(), PurePosixPath(target)))
        return mounts

    def host_path(self, service: str, container_path: str) -> Path | None:
        """Where a path inside the service's container comes from on the host, if it is bind-mounted."""
        path = PurePosixPath(container_path)
        for mount in sorted(self.mounts(service), key=lambda m: len(m.container.parts), reverse=True):
            if path == mount.container or mount.container in path.parents:
                return self.root / mount.host / path.relative_to(mount.container)
        return None

    @cached_property
    def dockerfile(self) -> list[Instruction]:
        build = self.services["airflow-scheduler"].get("build") or "."
        context, name = (
            (build, "Dockerfile")
            if isinstance(build, str)
            else (build.get("context", "."), build.get("dockerfile", "Dockerfile"))
        )
        text = (self.root / context / name).read_text()
        logical = re.sub(r"\\\n", " ", text)
        instructions = []
        for line in logical.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keyword, _, args = line.partition(" ")
                instructions.append(Instruction(keyword.upper(), args.strip()))
        return instructions

    @cached_property
    def sandbox_config(self) -> dict[str, Any]:
        path = self.host_path("growthhub-sandbox", self.sandbox_config_path)
        return yaml.safe_load(path.read_text())

    @property
    def sandbox_config_path(self) -> str:
        path = option(argv(self.services["growthhub-sandbox"].get("command")), "--config")
        assert path, "the growthhub-sandbox service passes no --config"
        return path

    def connection(self, variable: str) -> dict[str, Any]:
        return json.loads(self.env("airflow-worker")[variable])

    def pins(self, filename: str) -> dict[str, str]:
        pins = {}
        for line in (self.root / filename).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonicalize_name(name)] = version.strip()
        return pins


@pytest.fixture(scope="module")
def repo() -> Deployment:
    return Deployment(REPO)


# --------------------------------------------------------------------------- the checks


def missing_services(d: Deployment) -> list[str]:
    return [f"no service {name!r}" for name in EXPECTED_SERVICES if name not in d.services]


def wrong_airflow_commands(d: Deployment) -> list[str]:
    return [
        f"{name} runs {argv(d.services[name].get('command'))}, not `airflow {' '.join(expected)}`"
        for name, expected in AIRFLOW_SUBCOMMANDS.items()
        if argv(d.services[name].get("command")) != expected
    ]


def _init_script(d: Deployment) -> str:
    return "\n".join(argv(d.services["airflow-init"].get("command")))


def missing_bind_sources(d: Deployment) -> list[str]:
    """Bind-mounted host paths that are neither in the repo nor a runtime folder set up by airflow-init."""
    ignored = {line.strip().strip("/") for line in (d.root / ".gitignore").read_text().splitlines()}
    script = _init_script(d)
    problems = []
    for service in d.services:
        for mount in d.mounts(service):
            if (d.root / mount.host).exists():
                continue
            if mount.host in RUNTIME_DIRS and mount.host in ignored:
                # Created by Docker as root: airflow-init must hand it to AIRFLOW_UID.
                name = mount.container.name
                created = re.search(rf"mkdir [^\n]*\b{name}\b", script)
                if created and re.search(rf"chown [^\n]*\b{name}\b", script):
                    continue
            problems.append(f"{service} mounts ./{mount.host}, which is not in the repo")
    return problems


_CONTAINER_FILE = re.compile(r"/opt/airflow/[\w./-]+?\.(?:ya?ml|json)(?![\w.])")


def missing_command_files(d: Deployment) -> list[str]:
    """Config files a service's command reads from a mounted folder, missing on the host."""
    problems = []
    for service, spec in d.services.items():
        for arg in argv(spec.get("entrypoint")) + argv(spec.get("command")):
            for path in _CONTAINER_FILE.findall(arg):
                host = d.host_path(service, path)
                if host is not None and not host.is_file():
                    problems.append(f"{service} reads {path}, but {host.relative_to(d.root)} does not exist")
    return problems


def _copy_sources(d: Deployment) -> list[str]:
    sources = []
    for instruction in d.dockerfile:
        if instruction.keyword in {"COPY", "ADD"}:
            args = [arg for arg in shlex.split(instruction.args) if not arg.startswith("--")]
            if "--from=" not in instruction.args:
                sources.extend(args[:-1])
    return sources


def missing_copy_sources(d: Deployment) -> list[str]:
    return [
        f"the Dockerfile copies {src}, which does not exist"
        for src in _copy_sources(d)
        if not (d.root / src).exists()
    ]


def dockerignored_copy_sources(d: Deployment) -> list[str]:
    path = d.root / ".dockerignore"
    patterns = [line.strip() for line in path.read_text().splitlines()] if path.exists() else []
    patterns = [p.removeprefix("**/").rstrip("/") for p in patterns if p and not p.startswith(("#", "!"))]
    return [
        f"the Dockerfile copies {src}, which .dockerignore leaves out of the build context"
        for src in _copy_sources(d)
        if any(fnmatch(src.rstrip("/"), pattern) for pattern in patterns)
    ]


def _base_image(d: Deployment) -> tuple[str, str]:
    froms = [i.args for i in d.dockerfile if i.keyword == "FROM"]
    image = froms[-1].split()[0]
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\d.]+)-python(?P<python>\d+\.\d+)", image)
    assert match, f"the image is not built FROM apache/airflow:<version>-python<x.y>: {froms}"
    return match["airflow"], match["python"]


def airflow_version_mismatch(d: Deployment) -> list[str]:
    image, _ = _base_image(d)
    return [
        f"the image has Airflow {image}, {name} pins {pinned}"
        for name in ("requirements.txt", "constraints.txt")
        if (pinned := d.pins(name).get("apache-airflow")) != image
    ]


def python_version_mismatch(d: Deployment) -> list[str]:
    _, image = _base_image(d)
    problems = []
    requires = tomllib.loads((d.root / "pyproject.toml").read_text())["project"]["requires-python"]
    if not SpecifierSet(requires).contains(image + ".0"):
        problems.append(f"the image's Python {image} is outside requires-python {requires}")
    # constraints.txt is resolved on the Makefile's interpreter: the image must run the same one.
    match = re.search(r"^PYTHON\s*\?=\s*python(\d+\.\d+)\s*$", (d.root / "Makefile").read_text(), re.M)
    if not match or match[1] != image:
        problems.append(f"the image's Python {image} is not the Makefile's (constraints.txt's) PYTHON")
    return problems


def pip_installs_as_root(d: Deployment) -> list[str]:
    user, problems = "root", []
    for instruction in d.dockerfile:
        if instruction.keyword == "USER":
            user = instruction.args.split(":")[0]
        elif instruction.keyword == "RUN" and "pip install" in instruction.args and user != "airflow":
            problems.append(f"`{instruction.args}` runs as {user}, not airflow")
    return problems


def unconstrained_requirements(d: Deployment) -> list[str]:
    runs = [i.args for i in d.dockerfile if i.keyword == "RUN" and "pip install" in i.args]
    if any(
        re.search(r"-r \S*requirements\.txt", run) and re.search(r"-c \S*constraints\.txt", run)
        for run in runs
    ):
        return []
    return ["no `pip install -r requirements.txt -c constraints.txt` in the Dockerfile"]


def unpinned_project_dependencies(d: Deployment) -> list[str]:
    """The image installs the project with --no-deps: each of its dependencies must be pinned already."""
    pins = d.pins("constraints.txt") | d.pins("requirements.txt")
    problems = []
    for dependency in tomllib.loads((d.root / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None or not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(f"{dependency} is not satisfied by the pins ({pinned or 'not pinned'})")
    return problems


def _url_problems(what: str, url: str, d: Deployment, scheme: str, image: str) -> list[str]:
    parts = urlsplit(url)
    if not parts.scheme.startswith(scheme):
        return [f"{what} is not a {scheme} URL: {url}"]
    service = d.services.get(parts.hostname or "")
    if service is None or not str(service.get("image", "")).startswith(image):
        return [f"{what} points at {parts.hostname!r}, not a {image} service"]
    env = environment(service)
    if image == "postgres" and (parts.username, parts.password, parts.path.strip("/")) != (
        env.get("POSTGRES_USER"),
        env.get("POSTGRES_PASSWORD"),
        env.get("POSTGRES_DB"),
    ):
        return [f"{what} does not use {parts.hostname}'s POSTGRES_USER/PASSWORD/DB"]
    return []


def executor_problems(d: Deployment) -> list[str]:
    env = d.env("airflow-scheduler")
    if env.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
        return [f"the executor is {env.get('AIRFLOW__CORE__EXECUTOR')!r}, not CeleryExecutor"]
    problems = [
        *_url_problems(
            "the metadata DB", env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", ""), d, "postgresql", "postgres"
        ),
        *_url_problems("the Celery broker", env.get("AIRFLOW__CELERY__BROKER_URL", ""), d, "redis", "redis"),
        *_url_problems(
            "the Celery result backend",
            env.get("AIRFLOW__CELERY__RESULT_BACKEND", ""),
            d,
            "db+postgresql",
            "postgres",
        ),
    ]
    worker_deps = depends_on(d.services["airflow-worker"])
    for key in ("AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        host = urlsplit(env.get(key, "")).hostname
        if host not in worker_deps:
            problems.append(f"airflow-worker does not depend on {host} ({key})")
    return problems


def execution_api_problems(d: Deployment) -> list[str]:
    url = urlsplit(d.env("airflow-worker").get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
    api = d.services.get(url.hostname or "")
    if api is None or argv(api.get("command")) != ["api-server"]:
        return [f"the execution API URL points at {url.hostname!r}, not the api-server service"]
    port = int(option(argv(api.get("command")), "--port") or 8080)
    problems = []
    if url.port != port:
        problems.append(f"the execution API URL uses port {url.port}, the api-server {port}")
    if url.path.rstrip("/") != "/execution":
        problems.append(f"the execution API URL's path is {url.path!r}, not /execution/")
    return problems


def uncommon_environments(d: Deployment) -> list[str]:
    """Airflow services that lost part of the common environment (e.g. by redefining ``environment``)."""
    common = environment(d.compose["x-airflow-common"])
    return [
        f"{name} lacks {key} of x-airflow-common"
        for name in AIRFLOW_SERVICES
        for key, value in common.items()
        if name in d.services and key not in d.env(name) and value
    ]


def dangling_dependencies(d: Deployment) -> list[str]:
    return [
        f"{name} depends on {target!r}, which is no service"
        for name, spec in d.services.items()
        for target in depends_on(spec)
        if target not in d.services
    ]


def unreachable_conditions(d: Deployment) -> list[str]:
    """``service_healthy`` needs a healthcheck; ``service_completed_successfully`` a one-shot service."""
    problems = []
    for name, spec in d.services.items():
        for target, condition in depends_on(spec).items():
            other = d.services.get(target, {})
            if condition == "service_healthy" and "test" not in (other.get("healthcheck") or {}):
                problems.append(f"{name} waits for {target} to be healthy, which has no healthcheck")
            forever = other.get("restart") in {"always", "unless-stopped"}
            if condition == "service_completed_successfully" and forever:
                problems.append(f"{name} waits for {target} to complete, which restarts forever")
    return problems


def _extra(connection: dict[str, Any]) -> dict[str, Any]:
    """A connection's extra, which Airflow's JSON form allows as an object or as a JSON string."""
    extra = connection.get("extra") or {}
    return json.loads(extra) if isinstance(extra, str) else extra


def coordination_problems(d: Deployment) -> list[str]:
    """Celery workers on several hosts share a location's limits and tokens only through Redis.

    growthhub_default's ``coordination`` must name a ``redis`` connection of the common environment,
    on the compose Redis the workers wait for, in a database apart from the Celery broker's.
    """
    conn_id = _extra(d.connection("AIRFLOW_CONN_GROWTHHUB_DEFAULT")).get("coordination", "local")
    if conn_id == "local":
        return ["growthhub_default has no coordination: each Celery worker would limit itself alone"]
    variable = f"AIRFLOW_CONN_{conn_id.upper()}"
    if variable not in environment(d.compose["x-airflow-common"]):
        return [f"coordination names {conn_id!r}, but x-airflow-common defines no {variable}"]
    connection = d.connection(variable)
    if connection.get("conn_type") != "redis":
        return [f"{conn_id} is of conn_type {connection.get('conn_type')!r}, not redis"]
    problems = []
    host = connection.get("host")
    if not str(d.services.get(host or "", {}).get("image", "")).startswith("redis"):
        problems.append(f"{conn_id} points at {host!r}, not a redis service")
    elif host not in depends_on(d.services["airflow-worker"]):
        problems.append(f"airflow-worker does not depend on {host} ({conn_id})")
    broker = urlsplit(d.env("airflow-worker").get("AIRFLOW__CELERY__BROKER_URL", ""))
    broker_db = int(broker.path.strip("/") or 0)
    db = int(_extra(connection).get("db") or 0)
    if (broker.hostname, broker_db) == (host, db):
        problems.append(f"{conn_id} uses db {db} of {host}, the Celery broker's: keep them apart")
    return problems


def pool_problems(d: Deployment) -> list[str]:
    path = d.host_path("airflow-init", "/opt/airflow/deploy/pools.json")
    if path is None or not path.is_file():
        return ["airflow-init has no /opt/airflow/deploy/pools.json mounted"]
    pools = json.loads(path.read_text())
    problems = [
        f"pool {name} needs int slots > 0 and a description"
        for name, pool in pools.items()
        if not (isinstance(pool.get("slots"), int) and pool["slots"] > 0 and pool.get("description"))
    ]
    pool = ShardsConfig().pool
    return problems + ([] if pool in pools else [f"no pool {pool}: the sync's shard tasks wait in it"])


# --------------------------------------------------------------------------- services and commands


@pytest.mark.parametrize("name", EXPECTED_SERVICES)
def test_service_is_defined(repo: Deployment, name: str) -> None:
    assert name in repo.services


@pytest.mark.parametrize(("name", "subcommand"), AIRFLOW_SUBCOMMANDS.items())
def test_airflow_service_runs_its_subcommand(repo: Deployment, name: str, subcommand: list[str]) -> None:
    assert argv(repo.services[name].get("command")) == subcommand


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_airflow_service_runs_the_project_image(repo: Deployment, name: str) -> None:
    assert repo.services[name].get("build") == ".", "Airflow services are built from ./Dockerfile"


def test_init_migrates_the_metadata_database(repo: Deployment) -> None:
    assert repo.env("airflow-init").get("_AIRFLOW_DB_MIGRATE") == "true"


def test_init_imports_the_pools(repo: Deployment) -> None:
    assert re.search(r"airflow pools import /opt/airflow/deploy/pools\.json", _init_script(repo))


@pytest.mark.parametrize("name", ["growthhub-sandbox", "warehouse-seed"])
def test_project_tool_bypasses_the_airflow_entrypoint(repo: Deployment, name: str) -> None:
    # The image's /entrypoint runs `airflow <command>` unless the command starts with bash or python.
    service = repo.services[name]
    entrypoint = argv(service.get("entrypoint"))
    assert entrypoint, "the image's /entrypoint would run `airflow <command>`"
    assert "/entrypoint" not in entrypoint
    assert service.get("build") == "."


def test_sandbox_command_is_a_console_script_of_the_project(repo: Deployment) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv(repo.services["growthhub-sandbox"]["command"])[0] in scripts


def test_sandbox_listens_on_all_interfaces(repo: Deployment) -> None:
    assert option(argv(repo.services["growthhub-sandbox"]["command"]), "--host") == "0.0.0.0"


@pytest.mark.parametrize("name", ["growthhub-sandbox", "warehouse-seed"])
def test_project_tool_accepts_the_options_it_is_given(repo: Deployment, name: str) -> None:
    args = argv(repo.services[name]["command"])
    program = args[: args.index("-m") + 2] if args[0] == "python" else args[:1]
    # a subcommand is a word that is neither an option nor an option's value
    rest = args[len(program) :]
    subcommands = [
        arg
        for i, arg in enumerate(rest)
        if not arg.startswith("--") and (i == 0 or not rest[i - 1].startswith("--"))
    ]
    python = Path(sys.executable)
    executable = python if program[0] == "python" else python.with_name(program[0])  # a console script
    helps = [
        subprocess.run(
            [str(executable), *program[1:], *subcommands[:depth], "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
            check=False,
        )
        for depth in range(len(subcommands) + 1)
    ]
    assert [h.returncode for h in helps] == [0] * len(helps), [h.stderr for h in helps]
    help_text = "".join(h.stdout for h in helps)
    flags = [arg for arg in args if arg.startswith("--")]
    assert [flag for flag in flags if flag not in help_text] == [], f"`{' '.join(program)} --help`"


def test_seed_writes_to_the_warehouse_service(repo: Deployment) -> None:
    url = option(argv(repo.services["warehouse-seed"]["command"]), "--url") or ""
    assert _url_problems("the seed URL", url, repo, "postgresql", "postgres") == []
    assert urlsplit(url).hostname == "warehouse"


def test_seed_waits_for_a_healthy_warehouse(repo: Deployment) -> None:
    assert depends_on(repo.services["warehouse-seed"]) == {"warehouse": "service_healthy"}


def test_seed_runs_once(repo: Deployment) -> None:
    assert repo.services["warehouse-seed"].get("restart") in {None, "no"}


# --------------------------------------------------------------------------- mounts and files


def test_bind_mount_sources_exist(repo: Deployment) -> None:
    assert missing_bind_sources(repo) == []


@pytest.mark.parametrize("folder", ["dags", "logs", "config", "plugins", "include", "deploy", "var"])
def test_airflow_services_mount_the_project_folder(repo: Deployment, folder: str) -> None:
    for name in AIRFLOW_SERVICES:
        assert Mount(folder, PurePosixPath("/opt/airflow", folder)) in repo.mounts(name), name


def test_files_read_by_commands_exist(repo: Deployment) -> None:
    assert missing_command_files(repo) == []


def test_sandbox_config_is_mounted_into_the_sandbox(repo: Deployment) -> None:
    path = repo.host_path("growthhub-sandbox", repo.sandbox_config_path)
    assert path is not None, f"{repo.sandbox_config_path} is not under a mount of growthhub-sandbox"
    assert path.is_file()


def test_dockerfile_copy_sources_exist(repo: Deployment) -> None:
    assert missing_copy_sources(repo) == []


def test_dockerignore_keeps_copy_sources(repo: Deployment) -> None:
    assert dockerignored_copy_sources(repo) == []


@pytest.mark.parametrize("pattern", [".venv", ".airflow", "logs", ".git", "**/__pycache__", ".env"])
def test_dockerignore_excludes_local_state(pattern: str) -> None:
    assert pattern in (REPO / ".dockerignore").read_text().splitlines()


# --------------------------------------------------------------------------- image


def test_image_airflow_is_the_pinned_airflow(repo: Deployment) -> None:
    assert airflow_version_mismatch(repo) == []


def test_image_python_is_the_projects_python(repo: Deployment) -> None:
    assert python_version_mismatch(repo) == []


def test_image_installs_pip_packages_as_the_airflow_user(repo: Deployment) -> None:
    assert pip_installs_as_root(repo) == []


def test_image_installs_the_requirements_with_the_constraints(repo: Deployment) -> None:
    assert unconstrained_requirements(repo) == []


def test_image_installs_the_project(repo: Deployment) -> None:
    runs = [i.args for i in repo.dockerfile if i.keyword == "RUN"]
    assert any(re.search(r"pip install .*--no-deps -e /opt/airflow\b", run) for run in runs)


def test_project_dependencies_are_pinned_for_the_no_deps_install(repo: Deployment) -> None:
    assert unpinned_project_dependencies(repo) == []


# --------------------------------------------------------------------------- executor and wiring


def test_celery_executor_has_its_broker_backend_and_database(repo: Deployment) -> None:
    assert executor_problems(repo) == []


def test_execution_api_url_points_at_the_api_server(repo: Deployment) -> None:
    assert execution_api_problems(repo) == []


def test_airflow_services_share_the_common_environment(repo: Deployment) -> None:
    assert uncommon_environments(repo) == []


def test_jwt_secret_is_set_for_all_components(repo: Deployment) -> None:
    assert environment(repo.compose["x-airflow-common"]).get("AIRFLOW__API_AUTH__JWT_SECRET")


def test_dependencies_are_services(repo: Deployment) -> None:
    assert dangling_dependencies(repo) == []


def test_dependency_conditions_can_be_met(repo: Deployment) -> None:
    assert unreachable_conditions(repo) == []


@pytest.mark.parametrize("name", ["growthhub-sandbox", "warehouse"])
def test_worker_waits_for_what_its_tasks_talk_to(repo: Deployment, name: str) -> None:
    assert depends_on(repo.services["airflow-worker"]).get(name) == "service_healthy"


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("variable", CONNECTIONS)
def test_connection_is_json_with_type_and_host(repo: Deployment, variable: str) -> None:
    connection = repo.connection(variable)
    assert connection.get("conn_type")
    assert connection.get("host")


def test_growthhub_connection_points_at_the_sandbox_service(repo: Deployment) -> None:
    url = urlsplit(repo.connection("AIRFLOW_CONN_GROWTHHUB_DEFAULT")["host"])
    sandbox_port = option(argv(repo.services["growthhub-sandbox"]["command"]), "--port")
    assert (url.scheme, url.hostname, str(url.port)) == ("http", "growthhub-sandbox", sandbox_port)


def test_growthhub_connection_token_may_write_to_its_location(repo: Deployment) -> None:
    connection = repo.connection("AIRFLOW_CONN_GROWTHHUB_DEFAULT")
    tokens = {token["token"]: token for token in repo.sandbox_config["tokens"]}
    token = tokens.get(connection["password"])
    assert token is not None, "the connection's password is no token of the sandbox config"
    assert token["locationId"] == connection["extra"]["location_id"]
    assert "contacts.write" in token["scopes"]


def test_growthhub_connection_rate_limits_are_the_locations(repo: Deployment) -> None:
    extra = repo.connection("AIRFLOW_CONN_GROWTHHUB_DEFAULT")["extra"]
    limits = repo.sandbox_config["locations"][extra["location_id"]]["rateLimit"]
    assert (extra["rate_limit_burst"], extra["rate_limit_interval_ms"], extra["rate_limit_daily"]) == (
        limits["burst"],
        limits["intervalMs"],
        limits["daily"],
    )


def test_growthhub_coordination_is_the_compose_redis_apart_from_the_broker(repo: Deployment) -> None:
    assert coordination_problems(repo) == []


def test_warehouse_connection_uses_the_warehouse_service(repo: Deployment) -> None:
    c = repo.connection("AIRFLOW_CONN_WAREHOUSE_DEFAULT")
    url = f"postgresql://{c['login']}:{c['password']}@{c['host']}:{c.get('port', 5432)}/{c['schema']}"
    assert c["conn_type"] == "postgres"
    assert _url_problems("warehouse_default", url, repo, "postgresql", "postgres") == []


# --------------------------------------------------------------------------- deploy/ config


def test_sandbox_config_loads_as_the_sandbox_loads_it(repo: Deployment) -> None:
    from growthhub_sandbox.cli import load_config  # the code behind growthhub-sandbox --config

    path = repo.host_path("growthhub-sandbox", repo.sandbox_config_path)
    config = load_config(str(path))
    assert set(config.locations) == set(repo.sandbox_config["locations"])


def test_sandbox_tokens_belong_to_configured_locations(repo: Deployment) -> None:
    locations = repo.sandbox_config["locations"]
    assert all(token["locationId"] in locations for token in repo.sandbox_config["tokens"])


def test_the_api_host_has_a_pool(repo: Deployment) -> None:
    assert pool_problems(repo) == []


# --------------------------------------------------------------------------- the checks can fail


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: update this breakage"
    path.write_text(text.replace(old, new, 1))


def _drop_pool(path: Path) -> None:
    path.write_text(json.dumps({}))


def _drop_redis(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    del compose["services"]["redis"]
    path.write_text(yaml.safe_dump(compose))


def _worker_without_redis(path: Path) -> None:
    compose = yaml.safe_load(path.read_text())
    del compose["services"]["airflow-worker"]["depends_on"]["redis"]
    path.write_text(yaml.safe_dump(compose))


BREAKAGES: list[Any] = [
    pytest.param(missing_services, "docker-compose.yaml", _drop_redis, id="service-removed"),
    pytest.param(executor_problems, "docker-compose.yaml", _drop_redis, id="broker-service-removed"),
    pytest.param(dangling_dependencies, "docker-compose.yaml", _drop_redis, id="dependency-removed"),
    pytest.param(
        wrong_airflow_commands,
        "docker-compose.yaml",
        ("command: api-server", "command: webserver"),
        id="airflow-2-subcommand",
    ),
    pytest.param(
        missing_bind_sources,
        "docker-compose.yaml",
        ("/dags:/opt/airflow/dags", "/dagz:/opt/airflow/dags"),
        id="mount-of-missing-folder",
    ),
    pytest.param(
        missing_bind_sources,
        "docker-compose.yaml",
        ("mkdir -v -p /opt/airflow/{logs,", "mkdir -v -p /opt/airflow/{"),
        id="logs-not-created",
    ),
    pytest.param(
        missing_command_files,
        "docker-compose.yaml",
        ("/opt/airflow/deploy/pools.json", "/opt/airflow/deploy/pool.json"),
        id="missing-command-file",
    ),
    pytest.param(
        missing_copy_sources,
        "Dockerfile",
        ("COPY --chown=airflow:0 dags/", "COPY --chown=airflow:0 dag/"),
        id="missing-copy-source",
    ),
    pytest.param(
        dockerignored_copy_sources,
        ".dockerignore",
        ("\nlogs\n", "\nlogs\ninclude\n"),
        id="copy-source-dockerignored",
    ),
    pytest.param(
        airflow_version_mismatch,
        "Dockerfile",
        ("airflow:3.3.2-", "airflow:3.3.1-"),
        id="image-airflow-differs",
    ),
    pytest.param(
        python_version_mismatch, "Dockerfile", ("-python3.11", "-python3.12"), id="image-python-differs"
    ),
    pytest.param(pip_installs_as_root, "Dockerfile", ("USER airflow", "USER root"), id="pip-as-root"),
    pytest.param(
        executor_problems,
        "docker-compose.yaml",
        ("redis://:@redis:6379/0", "redis://:@cache:6379/0"),
        id="broker-host-unknown",
    ),
    pytest.param(
        executor_problems,
        "docker-compose.yaml",
        ("db+postgresql://airflow:airflow@", "db+postgresql://airflow:secret@"),
        id="backend-credentials",
    ),
    pytest.param(
        execution_api_problems,
        "docker-compose.yaml",
        ("http://airflow-apiserver:8080/execution/", "http://airflow-apiserver:8081/execution/"),
        id="execution-api-port",
    ),
    pytest.param(
        uncommon_environments,
        "docker-compose.yaml",
        ("      <<: *airflow-common-env\n      # Required", "      # Required"),
        id="worker-env-replaced",
    ),
    pytest.param(
        unreachable_conditions,
        "docker-compose.yaml",
        ('    user: "0:0"\n', '    user: "0:0"\n    restart: always\n'),
        id="init-restarts-forever",
    ),
    pytest.param(pool_problems, "deploy/pools.json", _drop_pool, id="pool-missing"),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        (', "coordination": "growthhub_coordination"', ""),
        id="coordination-local",
    ),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        ('"coordination": "growthhub_coordination"', '"coordination": "growthhub_redis"'),
        id="coordination-connection-undefined",
    ),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        ('{"conn_type": "redis", "host": "redis"', '{"conn_type": "http", "host": "redis"'),
        id="coordination-not-redis",
    ),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        ('"host": "redis", "port": 6379', '"host": "localhost", "port": 6379'),
        id="coordination-host-not-the-redis-service",
    ),
    pytest.param(coordination_problems, "docker-compose.yaml", _drop_redis, id="coordination-redis-removed"),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        ('"extra": {"db": 1}', '"extra": {}'),
        id="coordination-in-the-broker-db",
    ),
    pytest.param(
        coordination_problems,
        "docker-compose.yaml",
        ("redis://:@redis:6379/0", "redis://:@redis:6379/1"),
        id="broker-moved-to-the-coordination-db",
    ),
    pytest.param(
        coordination_problems, "docker-compose.yaml", _worker_without_redis, id="worker-without-redis"
    ),
]


@pytest.fixture
def project_copy(tmp_path: Path) -> Deployment:
    """A copy of the repo's files (not its virtualenv or caches) to break."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        ".airflow",
        "logs",
        "__pycache__",
        "*.egg-info",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "var",
        "gx",
        "data_docs",
    )
    shutil.copytree(REPO, tmp_path / "repo", ignore=ignore)
    return Deployment(tmp_path / "repo")


class TestChecksCatchBreakage:
    @pytest.mark.parametrize(("check", "filename", "breakage"), BREAKAGES)
    def test_check_reports_the_broken_copy(
        self,
        project_copy: Deployment,
        check: Callable[[Deployment], list[str]],
        filename: str,
        breakage: tuple[str, str] | Callable[[Path], None],
    ) -> None:
        assert check(project_copy) == [], "the intact copy must pass"
        if callable(breakage):
            breakage(project_copy.root / filename)
        else:
            _replace(project_copy.root / filename, *breakage)
        assert check(Deployment(project_copy.root)) != []
