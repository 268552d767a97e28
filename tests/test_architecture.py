"""The import rules drawn at the top of docs/architecture.md, checked on the source.

Every ``import`` counts, wherever it is written (module level, inside a
function, under ``TYPE_CHECKING``): a lazy import is still a dependency. The
rules are the layers of the picture; a module may import its own layer and the
layers listed for it, and nothing in ``daemon`` may form an import cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = "daemon.providers.api"
KIT = "daemon.providers.conformance"
ADAPTER_KINDS = ("sandbox", "stripe", "adyen", "checkout", "iyzico")
PLUGIN = ROOT / "tests" / "plugins" / "payd_echo_provider"

# Layer -> the layers its modules may import (their own layer always allowed).
ALLOWED: Mapping[str, frozenset[str]] = {
    "leaf": frozenset(),
    "provider-api": frozenset({"leaf"}),
    "registry": frozenset({"leaf", "provider-api", "adapter"}),  # the one door to the adapters
    "gateway": frozenset(),  # the sandbox gateway stands alone: no payd in a fake payment provider
    "core": frozenset({"leaf", "provider-api", "registry"}),
    "kit": frozenset(),  # test tooling for plugin authors: it imports only the API, nothing imports it
}
# The one import from daemon into the gateway's distribution: `payd sandbox`, inside the
# command's function, so that only that command loads it (tests/test_sandbox_package.py).
GATEWAY_DOOR = ("daemon.cli", "payd_sandbox.cli")


def layer(module: str) -> str:
    """Which box of the picture in docs/architecture.md a module belongs to."""
    if module in ("daemon.models", "daemon.errors", "daemon.secrets"):
        return "leaf"
    if module in (API, "daemon.providers.base", "daemon.providers.http", "daemon.providers.adapter"):
        return "provider-api"
    if module == "daemon.providers.registry":
        return "registry"
    if module == KIT:
        return "kit"
    if module.partition(".")[0] == "payd_sandbox":
        return "gateway"
    if module.startswith(tuple(f"daemon.providers.{kind}" for kind in ADAPTER_KINDS)):
        return "adapter"
    return "core"


def adapter_package(module: str) -> str:
    """The adapter a module belongs to: ``daemon.providers.stripe`` for the Stripe client."""
    return ".".join(module.split(".")[:3])


def module_files(package_dir: Path) -> dict[str, Path]:
    files = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a.b``: b may be a module)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that ``name`` is or is inside of."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in files.items():
        targets = {resolve(name, files) for name in imported_names(module, path)}
        graph[module] = {target for target in targets if target is not None and target != module}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def forbidden_imports(graph: Mapping[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        mine = layer(module)
        for target in sorted(targets):
            theirs = layer(target)
            if mine == "kit":
                if target != API:
                    problems.append(f"{module} -> {target}: the conformance kit imports only {API}")
            elif mine == "adapter":
                # An adapter sees the provider API and its own package, nothing else of payd.
                own = theirs == "adapter" and adapter_package(target) == adapter_package(module)
                if target != API and not own:
                    problems.append(f"{module} -> {target}: an adapter imports only {API}")
            elif (module, target) == GATEWAY_DOOR:
                continue
            elif theirs != mine and theirs not in ALLOWED[mine]:
                problems.append(f"{module} ({mine}) -> {target} ({theirs})")
    return problems


def reaches(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


DAEMON = module_files(ROOT / "daemon")
GATEWAY = module_files(ROOT / "sandbox" / "payd_sandbox")


def test_no_module_imports_across_the_layers() -> None:
    """Adapters import only the provider API; the provider API and the leaves import no core
    module; the core reaches adapters only through the registry; the sandbox gateway imports
    nothing of daemon, and daemon nothing of it but ``payd sandbox``'s door. (Failed before
    this rule: every adapter imported ``daemon.config``.)"""
    assert GATEWAY, ROOT / "sandbox"
    assert forbidden_imports(import_graph(DAEMON | GATEWAY)) == []


def test_no_module_cycle() -> None:
    """No two modules of ``daemon`` import each other, directly or through others. (Failed
    before: config -> providers.registry -> sandbox.adapter -> providers.base -> config.)"""
    assert cycles(import_graph(DAEMON)) == []


def test_the_checks_can_fail() -> None:
    """The checker itself finds a cycle and a forbidden import when there is one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    bad = {"daemon.providers.stripe.client": {"daemon.config", API}, "daemon.models": {"daemon.config"}}
    assert forbidden_imports(bad) == [
        "daemon.models (leaf) -> daemon.config (core)",
        f"daemon.providers.stripe.client -> daemon.config: an adapter imports only {API}",
    ]
    gateway = {
        "daemon.cli": {"payd_sandbox.cli", "payd_sandbox.gateway"},
        "daemon.service": {"payd_sandbox.cli"},
        "daemon.providers.sandbox.adapter": {"payd_sandbox.gateway", API},
        "payd_sandbox.gateway": {"daemon.models", "payd_sandbox.behaviour"},
    }
    assert forbidden_imports(gateway) == [
        "daemon.cli (core) -> payd_sandbox.gateway (gateway)",
        f"daemon.providers.sandbox.adapter -> payd_sandbox.gateway: an adapter imports only {API}",
        "daemon.service (core) -> payd_sandbox.cli (gateway)",
        "payd_sandbox.gateway (gateway) -> daemon.models (leaf)",
    ]


def test_daemon_imports_the_gateway_only_inside_the_sandbox_command() -> None:
    """The door from daemon to payd_sandbox is an import inside ``cmd_sandbox``, never at
    module level, where it would load the gateway with every command."""
    tree = ast.parse((ROOT / "daemon" / "cli.py").read_text(encoding="utf-8"))
    for node in tree.body:
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("payd_sandbox"):
                assert isinstance(node, ast.FunctionDef), ast.dump(node)[:80]
                assert node.name == "cmd_sandbox"


def test_storage_and_subscriptions_do_not_pull_in_the_broker() -> None:
    """The renewal scheduler and the storage layer load without the AMQP stack: the database
    error set lives with the pool (``daemon.storage.db``), not in the pipeline. (Failed
    before: the scheduler imported ``DB_ERRORS`` from ``daemon.pipeline.attempts``.)"""
    graph = import_graph(DAEMON)
    for module in DAEMON:
        if module.startswith(("daemon.storage", "daemon.subscriptions")):
            assert "daemon.broker" not in reaches(graph, module), module
            external = {name for dep in {module} | reaches(graph, module) for name in _external(dep)}
            assert "aio_pika" not in external, module


def _external(module: str) -> set[str]:
    return {name.split(".")[0] for name in imported_names(module, DAEMON[module])} - {"daemon"}


def test_the_example_plugin_imports_only_the_provider_api() -> None:
    """The plugin the tests install (``tests/plugins/payd_echo_provider``) is written against
    ``daemon.providers.api`` alone, as docs/providers.md tells plugin authors to; its test
    support (``testing``) may also use the conformance kit, and nothing else of payd."""
    files = module_files(PLUGIN)
    assert files, PLUGIN
    for module, path in files.items():
        ours = {name for name in imported_names(module, path) if name.split(".")[0] == "daemon"}
        allowed = {API, KIT} if module.endswith(".testing") else {API}
        assert {API} <= {resolve(name, DAEMON) for name in ours} <= allowed, (module, sorted(ours))


def test_the_conformance_kit_is_test_tooling_on_the_api_alone() -> None:
    """The kit imports nothing of payd but the provider API, and no module of the daemon imports
    it: it is shipped for plugin authors' tests, and pulls pytest in."""
    graph = import_graph(DAEMON)
    assert graph[KIT] == {API}
    assert [module for module, targets in graph.items() if KIT in targets] == []
    bad = {"daemon.service": {KIT}, KIT: {API, "daemon.config"}}
    assert forbidden_imports(bad) == [
        f"{KIT} -> daemon.config: the conformance kit imports only {API}",
        f"daemon.service (core) -> {KIT} (kit)",
    ]
