"""The code's shape stays as issue 12 left it: no module under models/, pipeline/ or jobs/ over 400
lines, no function over 60 lines, none with more than 7 parameters (dataclass constructors are
generated, so they do not appear here)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES, MAX_FUNCTION_LINES, MAX_PARAMS = 400, 60, 7


def sources():
    return sorted(p for top in ("models", "pipeline", "jobs") for p in (ROOT / top).rglob("*.py"))


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def params(node) -> list[str]:
    a = node.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]


def test_modules_stay_short():
    lines = {str(p.relative_to(ROOT)): p.read_text().count("\n") for p in sources()}
    long = {name: n for name, n in lines.items() if n > MAX_FILE_LINES}
    assert not long, f"over {MAX_FILE_LINES} lines: {long}"


def test_functions_stay_short_with_few_parameters():
    found = []
    for path in sources():
        for f in functions(path):
            where = f"{path.relative_to(ROOT)}:{f.lineno} {f.name}"
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{where}: {f.end_lineno - f.lineno + 1} lines")
            if len(params(f)) > MAX_PARAMS:
                found.append(f"{where}: {len(params(f))} parameters")
    assert sources() and not found, found
