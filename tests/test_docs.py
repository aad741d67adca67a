"""The API reference builds from the docstrings in strict mode: a broken reference or page fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_api_reference_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    page = (tmp_path / "site" / "api" / "kit" / "index.html").read_text()
    assert "register_architecture" in page and "select_modules" in page  # the reference holds the docstrings


def test_every_public_module_has_a_reference_page() -> None:
    pages = "".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))
    package = ROOT / "lightning_efficient"
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in package.rglob("*.py")
        if not any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(package).parts)
    }
    documented = {line.removeprefix("::: ").strip() for line in pages.splitlines() if line.startswith("::: ")}
    covered = {m for m in modules if any(m == d or m.startswith(d + ".") for d in documented)}
    subpackages = {m for m in modules if (ROOT / Path(*m.split("."))).is_dir()}  # their __init__ only re-exports
    deprecated = {m for m in modules if _docstring(m).startswith("Deprecated")}  # moved: documented at the new path
    assert modules - covered - subpackages - deprecated - {"lightning_efficient"} == set()


def _docstring(module: str) -> str:
    import ast

    path = ROOT / Path(*module.split("."))
    source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
    return ast.get_docstring(ast.parse(source)) or ""


def test_readme_python_blocks_parse_and_import_existing_names() -> None:
    import ast
    import importlib
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        tree = ast.parse(block.replace(", ...)", ")"))  # sketches elide trailing arguments with ", ..."
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("lightning_efficient"):
                module = importlib.import_module(node.module)
                missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
                assert not missing, f"README imports {missing} from {node.module}, which has no such name"
