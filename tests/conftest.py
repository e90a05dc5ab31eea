"""Shared fixtures: real local registries, offline-built test images, the `uctr` runner and
the fault-injecting proxy. See tests/harness/ for the pieces and README.md ("Tests").

Fixture contract (session scope unless noted):
  registry_http, registry_tls, registry_token, registry_basic -> harness.registry.Registry
  test_images  -> Mapping name -> harness.images.TestImage ("busybox", "layers", "layers-zstd",
                  "debian", "multiarch"); built on first access (debian: cached across runs,
                  see harness.debian). Iterating builds them all, debian included.
  pushed       -> Mapping name -> "127.0.0.1:PORT/NAME:1" on registry_http, pushed on access
  push         -> push(name_or_image, registry, repo=None, tag=None) -> reference
  uctr         (function) -> UctrRunner: uctr(*args, env=None, input=None, user=None)
                  -> CompletedProcess(text) of `python -m uctr_batch ARGS`
  fault_proxy  (function) -> harness.faults.FaultProxy in front of registry_http
  fault_proxy_for (function) -> make(registry) -> FaultProxy in front of that registry
  test_user    -> "uctrtest";  run_as_test_user(argv, env=None, **kw) -> CompletedProcess
"""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.harness import users
from tests.harness.faults import FaultProxy
from tests.harness.images import ImageSet, PushedSet, TestImage, push as push_image
from tests.harness.registry import Registry

REPO = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = REPO / "tests" / "integration"
PYTHON = os.environ.get("UCTR_TEST_PYTHON", sys.executable)


def pytest_sessionstart(session):
    """Stop at once, with the reason, when the test user cannot read this checkout: the many
    tests that run its code as that user would all fail (scripts/test tests a readable copy)."""
    package = REPO / "uctr_batch" / "__init__.py"
    if users.can_switch_user() and not users.can_read(users.TEST_USER, package):
        pytest.exit(f"the test user {users.TEST_USER} cannot read {REPO}, and many tests run "
                    f"its code as that user; run scripts/test, which tests a readable copy, or "
                    f"put the checkout where {users.TEST_USER} can read it",
                    returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


class HarnessState:
    """What the session started, so the uctr runner can point the CLI at it."""

    def __init__(self, root: Path):
        self.root = root
        self.registries: List[Registry] = []
        self.proxies: List[FaultProxy] = []

    def start_registry(self, name: str, **kwargs) -> Registry:
        registry = Registry(self.root / "registries" / name, **kwargs).start()
        self.registries.append(registry)
        return registry

    def insecure_hosts(self) -> List[str]:
        hosts = [r.host for r in self.registries if r.insecure]
        return hosts + [p.host for p in self.proxies]

    def ca_file(self) -> Optional[str]:
        return next((r.ca_file for r in self.registries if r.ca_file), None)


@pytest.fixture(autouse=True)
def _remove_deep_trees(request):
    """Tests marked `deep` build trees deeper than shutil.rmtree can remove (it recurses):
    left behind by a failure, such a tree would break pytest's own clean-up of old tmp
    dirs in a later run, and the harness's. Their directories go with the product's own
    fsutil.remove_tree, pass or fail."""
    if request.node.get_closest_marker("deep") is None:
        yield
        return
    from uctr_batch import fsutil

    # asked for now, so that they are torn down after this fixture
    tmp_path = request.getfixturevalue("tmp_path")
    runner = request.getfixturevalue("uctr") if "uctr" in request.fixturenames else None
    yield
    targets = [tmp_path] + ([dirs.base for dirs in runner.all_dirs()] if runner else [])
    for target in targets:
        try:
            fsutil.remove_tree(target)
        except FileNotFoundError:
            pass


@pytest.fixture(scope="session")
def harness():
    # World-traversable (0755) so the unprivileged test user reaches its own subdirectories.
    root = Path(tempfile.mkdtemp(prefix="uctr-harness-", dir="/tmp"))
    root.chmod(0o755)
    state = HarnessState(root)
    yield state
    for proxy in state.proxies:
        proxy.stop()
    for registry in state.registries:
        registry.stop()
    shutil.rmtree(root, ignore_errors=True)


def _registry_fixture(name: str, **kwargs):
    @pytest.fixture(scope="session", name=name)
    def fixture(harness):
        registry = harness.start_registry(name, **kwargs)
        yield registry
        registry.stop()
    return fixture


registry_http = _registry_fixture("registry_http")
registry_tls = _registry_fixture("registry_tls", tls=True)
registry_token = _registry_fixture("registry_token", auth="token")
registry_basic = _registry_fixture("registry_basic", auth="basic")


@pytest.fixture(scope="session")
def test_images(harness) -> ImageSet:
    return ImageSet(harness.root / "images")


@pytest.fixture(scope="session")
def pushed(registry_http, test_images) -> PushedSet:
    return PushedSet(registry_http, test_images)


@pytest.fixture(scope="session")
def push(test_images):
    def push_to(image, registry, repo: Optional[str] = None, tag: Optional[str] = None) -> str:
        if not isinstance(image, TestImage):
            image = test_images[image]
        return push_image(image, registry, repo=repo, tag=tag)
    return push_to


@pytest.fixture
def fault_proxy(harness, registry_http):
    proxy = FaultProxy(registry_http.host).start()
    harness.proxies.append(proxy)
    yield proxy
    harness.proxies.remove(proxy)
    proxy.stop()


@pytest.fixture
def fault_proxy_for(harness):
    """Factory: fault_proxy_for(registry) -> a FaultProxy in front of another plain-HTTP registry."""
    started: List[FaultProxy] = []

    def make(registry: Registry) -> FaultProxy:
        proxy = FaultProxy(registry.host).start()
        harness.proxies.append(proxy)
        started.append(proxy)
        return proxy
    yield make
    for proxy in started:
        harness.proxies.remove(proxy)
        proxy.stop()


@pytest.fixture(scope="session")
def test_user() -> str:
    return users.TEST_USER


def _require_test_user() -> None:
    if not users.can_switch_user():
        pytest.skip(f"needs root and the user {users.TEST_USER} (run scripts/install.sh)")


@pytest.fixture(scope="session")
def run_as_test_user():
    def run(argv, env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.CompletedProcess:
        _require_test_user()
        return users.run_as(users.TEST_USER, argv, env=env, **kwargs)
    return run


@pytest.fixture(scope="session")
def package_for_test_user(harness) -> Path:
    """Directory to put on PYTHONPATH for runs as the test user (a readable package copy)."""
    src = harness.root / "src"
    users.copy_package(REPO / "uctr_batch", src)
    return src


@dataclass
class UctrDirs:
    base: Path    # owned by the user; cwd of the run
    home: Path    # HOME (so ~/.docker/config.json is per test)
    cache: Path   # UCTR_CACHE (not created in advance)
    local: Path   # UCTR_LOCAL_DIR (not created in advance: the CLI must create it safely)
    config: Path  # UCTR_CONFIG_DIR (not created in advance)


class UctrRunner:
    """Runs `python -m uctr_batch` with per-test, per-user directories."""

    def __init__(self, harness: HarnessState, tmp_path: Path, request):
        self._harness, self._tmp_path, self._request = harness, tmp_path, request
        self._dirs: Dict[Optional[str], UctrDirs] = {}

    def dirs(self, user: Optional[str] = None) -> UctrDirs:
        if user not in self._dirs:
            self._dirs[user] = self._make_dirs(user)
        return self._dirs[user]

    def all_dirs(self) -> List[UctrDirs]:
        return list(self._dirs.values())

    def _make_dirs(self, user: Optional[str]) -> UctrDirs:
        if user is None:
            base = self._tmp_path / "uctr"
        else:
            _require_test_user()
            base = self._harness.root / "users" / f"{user}-{uuid.uuid4().hex[:8]}"
            base.parent.mkdir(exist_ok=True)
            base.parent.chmod(0o755)
        base.mkdir(parents=True)
        (base / "home").mkdir()
        if user is not None:
            users.chown_tree(base, user)
        return UctrDirs(base, base / "home", base / "cache", base / "local", base / "config")

    def env(self, user: Optional[str] = None, env: Optional[Dict[str, Optional[str]]] = None
            ) -> Dict[str, str]:
        """The complete environment of a run; a None value in ENV removes that variable."""
        dirs = self.dirs(user)
        if user is None:
            pythonpath = str(REPO)
        else:
            pythonpath = str(self._request.getfixturevalue("package_for_test_user"))
        result = {
            "PATH": users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(dirs.home),
            "USER": user or "root", "LOGNAME": user or "root", "PYTHONPATH": pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1",
            "UCTR_CACHE": str(dirs.cache), "UCTR_LOCAL_DIR": str(dirs.local),
            "UCTR_CONFIG_DIR": str(dirs.config),
            "UCTR_INSECURE_REGISTRIES": ",".join(self._harness.insecure_hosts()),
        }
        ca_file = self._harness.ca_file()
        if ca_file:
            result["UCTR_TLS_CA"] = ca_file
        for key, value in (env or {}).items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = str(value)
        return result

    def argv(self, *args, user: Optional[str] = None,
             env: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
        command = [PYTHON, "-m", "uctr_batch", *map(str, args)]
        if user is None:
            return command
        return users.as_user_argv(user, command, self.env(user, env))

    def __call__(self, *args, env=None, input=None, user=None, timeout: float = 300,
                 ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.argv(*args, user=user, env=env), env=self.env(user, env), input=input,
            capture_output=True, text=True, timeout=timeout, cwd=self.dirs(user).base,
        )

    def popen(self, *args, env=None, user=None, **kwargs) -> subprocess.Popen:
        """Start a run without waiting (concurrency tests); stdout/stderr piped as text."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        return subprocess.Popen(self.argv(*args, user=user, env=env), env=self.env(user, env),
                                cwd=self.dirs(user).base, **kwargs)


@pytest.fixture
def uctr(harness, tmp_path, request) -> UctrRunner:
    return UctrRunner(harness, tmp_path, request)


@pytest.fixture(scope="session")
def slurm_cluster(test_images):
    """harness.slurm.SessionCluster: munge, slurmctld and two slurmd nodes in their own
    namespaces, the uctr SPANK plugin and prolog/epilog, a registry on the nodes' bridge.
    UCTR_SLURM_KEEP=1 leaves it running for the next session (re-used in well under 1 s)."""
    from tests.harness import slurm

    why = slurm.missing_prerequisites()
    if why:
        pytest.skip(why)
    cluster = slurm.SessionCluster(REPO, PYTHON, test_images).start()
    yield cluster
    cluster.stop(keep_running=os.environ.get("UCTR_SLURM_KEEP") == "1")
