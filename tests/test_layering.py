"""The package's layers: the library core, the applications built on it (``steadygrad.apps``) and
the command line around them (``steadygrad.cli``); imports point down only."""

import ast
import pathlib
import subprocess
import sys

import steadygrad

ROOT = pathlib.Path(steadygrad.__file__).parent
LAYERS = {"core": 0, "apps": 1, "integrations": 1, "cli": 2}  # a module may import its own layer and those below


def _layer(module: str) -> str:
    """``steadygrad.apps.demo.report`` -> ``apps``; library modules are ``core``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("apps", "integrations", "cli") else "core"


def _imports(path: pathlib.Path) -> list[str]:
    """The steadygrad modules ``path`` imports (relative imports resolved), at any depth of the file."""
    package = ("steadygrad." + ".".join(path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "steadygrad"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "steadygrad":
                # `from .. import apps` names a module in the alias
                out += [module] + [f"{module}.{a.name}" for a in node.names if a.name in ("apps", "cli")]
    return out


def test_imports_point_down_only():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = "steadygrad." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = LAYERS[_layer(module)]
        for target in _imports(path):
            if LAYERS[_layer(target)] > own:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_layering_check_sees_relative_imports():
    sample = ROOT / "apps" / "demo" / "report.py"
    assert "steadygrad.apps.demo" in _imports(sample)  # `from . import ZCLIP_Z, ...`
    assert "steadygrad.apps" in _imports(sample)  # `from .. import COLORS`
    assert "steadygrad.apps.bench" in _imports(ROOT / "cli" / "bench.py")


def test_import_steadygrad_loads_no_application_plotting_or_framework_module():
    code = (
        "import sys, steadygrad, steadygrad.optim, steadygrad.transforms\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn', 'pandas', 'lightning',\n"
        "             'pytorch_lightning', 'transformers', 'accelerate')\n"
        "             or m.split('.')[:2] in (['steadygrad', 'apps'], ['steadygrad', 'cli'],"
        " ['steadygrad', 'integrations']))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
