"""The dependency rule (docs/architecture.md): which of our packages may import which.

An AST walk over src/ checks every import statement (including function-local ones) against an
allowlist; a subprocess checks that the torch-free processes really start without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
OURS = {"frontend", "enginecore", "workers", "shm", "kernels", "sampling"}
LEAVES = {"enginecore.config", "enginecore.lora_adapter", "enginecore.protocol", "sampling.params"}
THIRD_PARTY_BANNED = {"torch", "triton", "transformers"}


def allowed(module: str, target: str) -> bool:
    """May `module` (e.g. 'enginecore.core') import `target` (e.g. 'enginecore.protocol')?"""
    pkg = module.split(".")[0]
    tpkg = target.split(".")[0]
    if module == "sampling.params":
        return False
    if module in LEAVES:
        return target == "sampling.params"
    if pkg in ("kernels", "shm"):
        return tpkg == pkg
    if pkg == "sampling":
        return tpkg in ("kernels", "sampling")
    if pkg == "enginecore":
        return (tpkg in ("enginecore", "shm") or target == "sampling.params"
                or target.startswith("sampling.structured"))
    if pkg == "workers":
        return (target in LEAVES or tpkg in ("workers", "shm", "kernels", "sampling"))
    if pkg == "frontend":
        return (tpkg == "frontend" or target in LEAVES or target.startswith("sampling.structured")
                or target == "sampling.logits_processor")
    raise AssertionError(f"unknown package {pkg}")


# Frontend modules allowed a function-local torch import, used only on request: decoding
# `prompt_embeds` needs torch.load (the subprocess test below still checks startup is torch-free).
LAZY_TORCH = {"frontend.prompt_embeds"}


def torch_free(module: str) -> bool:
    if module in LAZY_TORCH:
        return False
    pkg = module.split(".")[0]
    return (pkg in ("frontend", "enginecore", "shm")
            or module in ("sampling.params", "sampling.logits_processor"))


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_dependency_rule():
    violations = []
    files = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] in OURS]
    assert len(files) > 20
    for path in files:
        module = module_name(path)
        for target in imports_of(path):
            top = target.split(".")[0]
            if top in OURS and not allowed(module, target):
                violations.append(f"{module} imports {target}")
            if top in THIRD_PARTY_BANNED and torch_free(module):
                violations.append(f"{module} imports {target} (must stay torch-free)")
    assert not violations, "\n".join(violations)


def test_torch_free_processes_start_without_torch():
    code = ("import sys, enginecore.core, enginecore.__main__, frontend, frontend.client, "
            "frontend.offline, frontend.server, frontend.serving, frontend.__main__, shm; "
            "bad = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_allowlist_itself():
    # The rule must reject what the architecture forbids, or the test above proves nothing.
    assert not allowed("enginecore.core", "workers.runner")
    assert not allowed("frontend.client", "workers.worker")
    assert not allowed("shm.queue", "enginecore.protocol")
    assert not allowed("enginecore.protocol", "enginecore.core")
    assert allowed("workers.runner", "enginecore.protocol")
    assert not allowed("workers.runner", "enginecore.scheduler")
    assert not allowed("sampling.params", "sampling.sampler")
    assert not allowed("kernels.attention", "workers.attention")
