"""The README is tested: its shell examples run, and every route, status, error code, header and
XRAY_* variable it names exists in the code, so it cannot drift unnoticed.

Each ```bash block follows a marker: `<!-- test: run -->` (run here, from a scratch project folder
whose store holds a promoted smoke model) or `<!-- test: skip (why) -->` (servers, AWS, minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from xray.api import create_app
from xray.api.errors import ERROR_CODES, HTTP_CODES
from xray.decoding import ERROR_STATUSES
from xray.settings import Settings

README = (REPO / "README.md").read_text()
MARKER = re.compile(r"<!-- test: (run|skip)\b[^>]*-->\s*$")
TEST_ONLY_VARIABLES = {"XRAY_REQUIRE_ALL_TESTS"}  # read by tests/conftest.py, not by the product
SOURCES = "\n".join(path.read_text() for path in (REPO / "xray").rglob("*.py"))


@dataclass(frozen=True)
class ShellBlock:
    """One ```bash block of the README, its first line number and its marker (None when unmarked)."""

    line: int
    marker: str | None
    text: str


def shell_blocks() -> list[ShellBlock]:
    """Every ```bash block of the README, in order."""
    lines = README.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            end = next(number for number in range(index + 1, len(lines)) if lines[number].strip() == "```")
            previous = lines[index - 1] if index else ""
            found = MARKER.match(previous.strip())
            blocks.append(ShellBlock(index + 1, found.group(1) if found else None, "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks


RUNNABLE = [block for block in shell_blocks() if block.marker == "run"]


def test_every_shell_example_is_marked_run_or_skip():
    unmarked = [block.line for block in shell_blocks() if block.marker is None]
    assert not unmarked, f"README lines {unmarked}: put <!-- test: run --> or <!-- test: skip (why) --> before"
    assert len(RUNNABLE) >= 5


@pytest.fixture(scope="module")
def project(trained_store, tmp_path_factory) -> Path:
    """A scratch project folder: the repository's venv, configs and sample data, and a store with a model."""
    root = tmp_path_factory.mktemp("readme-project")
    for name in (".venv", "configs", "data"):
        (root / name).symlink_to(REPO / name)
    shutil.copytree(trained_store, root / "store")
    shutil.copytree(trained_store.parent / "artifacts", root / "artifacts",
                    ignore=shutil.ignore_patterns("cache"))  # fmt: skip
    return root


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{block.line}" for block in RUNNABLE])
def test_the_shell_example_runs(block, project):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("XRAY_")}
    environment |= {"XRAY_HOME": str(project), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=project, env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"README line {block.line}:\n{block.text}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def test_commands_are_written_in_one_style():
    for number, line in enumerate(README.splitlines(), start=1):
        if "docker run" in line:  # the image's own python
            continue
        for found in re.finditer(r"(\S*)python (-m xray|scripts/)", line):
            assert found.group(1).endswith(".venv/bin/"), f"README line {number}: write `.venv/bin/python ...`"


def application_routes() -> dict[str, set[str]]:
    """Path (parameters as `{}`) -> methods: the OpenAPI operations, the page and FastAPI's docs."""
    routes: dict[str, set[str]] = {"/": {"GET"}, "/docs": {"GET"}, "/redoc": {"GET"}, "/openapi.json": {"GET"}}
    for method, path in operation_statuses():
        routes.setdefault(path, set()).add(method)
    return routes


def normalise(path: str) -> str:
    """`/train/<job_id>` and `/train/{job_id}` alike as `/train/{}`."""
    return re.sub(r"<[^>]*>|\{[^}]*\}", "{}", path.rstrip("/") or "/")


def test_every_route_the_readme_names_exists():
    routes = application_routes()
    named = re.findall(r"\b(GET|POST|PUT|PATCH|DELETE) (/[\w/{}<>-]*)", README)
    assert named
    for method, path in named:
        assert method in routes.get(normalise(path), set()), f"README names {method} {path}; the app has no such route"
    for path in re.findall(r"`(/[a-z][\w/{}<>-]*)`", README):
        assert normalise(path) in routes or path.startswith("/home/"), f"README names {path}; the app has no such route"


def operation_statuses() -> dict[tuple[str, str], set[int]]:
    """(METHOD, path) -> the statuses its OpenAPI operation declares."""
    with tempfile.TemporaryDirectory() as folder:  # the app makes its store folder: not in the checkout
        spec = create_app(Settings(storage_uri=str(Path(folder) / "store")), load_model=False).openapi()
    return {(method.upper(), normalise(path)): {int(code) for code in operation["responses"]}
            for path, operations in spec["paths"].items() for method, operation in operations.items()}  # fmt: skip


def test_every_status_in_the_route_table_is_one_the_route_declares():
    declared = operation_statuses()
    rows = re.findall(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^` ]*)`[^|]*\|(.*)\|\s*$", README, re.MULTILINE)
    assert rows
    for method, path, text in rows:
        statuses = {int(code) for code in re.findall(r"\b([1-5]\d\d)\b", text)}
        assert statuses <= declared[(method, normalise(path))] | {200, 422}, f"{method} {path}: {statuses}"
    everything = set().union(*declared.values())
    for code in re.findall(r"`([1-5]\d\d)`|^# ([1-5]\d\d) \{", README, re.MULTILINE):
        status = int(code[0] or code[1])
        assert status in everything, f"README names status {status}; no route declares it"


def raised_statuses(code: str) -> set[int]:
    """The statuses the code answers with an error code."""
    if code in ERROR_STATUSES:
        return {ERROR_STATUSES[code]}
    found = {int(status) for status in re.findall(rf"(?:ApiError|error_response)\(\s*(\d{{3}}),\s*\"{code}\"", SOURCES)}
    found |= {status for status, name in HTTP_CODES.items() if name == code}
    return found | ({422} if code == "invalid_request" else set())


def test_every_error_code_in_the_readme_exists_with_its_status():
    table = README[README.index("| error | status | when |"):].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (`\w+`(?: / `\w+`)*) \| ([\d /]+) \|", table, re.MULTILINE)
    assert len(rows) >= 10
    documented = set()
    for codes_cell, statuses_cell in rows:
        codes = re.findall(r"`(\w+)`", codes_cell)
        statuses = [int(status) for status in re.findall(r"\d{3}", statuses_cell)]
        statuses = statuses * len(codes) if len(statuses) == 1 else statuses
        for code, status in zip(codes, statuses, strict=True):
            assert code in ERROR_CODES or code in ERROR_STATUSES, f"README error code {code!r} is not in the code"
            assert status in raised_statuses(code), f"README says {code} is {status}; the code: {raised_statuses(code)}"
            documented.add(code)
    assert set(ERROR_STATUSES) <= documented, f"document {sorted(set(ERROR_STATUSES) - documented)} in the README"


def test_every_header_the_readme_names_is_sent_by_the_code():
    headers = set(re.findall(r"`(X-[A-Za-z-]+)`", README))
    assert headers
    for header in headers:
        assert f'"{header}"' in SOURCES, f"README names header {header}; no code sends it"


def test_the_readme_documents_exactly_the_settings():
    workflows = "".join(path.read_text() for path in (REPO / ".github" / "workflows").glob("*.yml"))
    github_names = set(re.findall(r"\b(?:vars|secrets)\.(XRAY_\w+)", workflows))  # repository variables, not ours
    named = set(re.findall(r"\bXRAY_[A-Z_]*[A-Z]", README))
    variables = set(Settings.variables())
    unknown = named - variables - TEST_ONLY_VARIABLES - github_names
    assert unknown == set(), f"README names {sorted(unknown)}, which xray/settings.py lacks"
    assert variables - named == set(), f"document {sorted(variables - named)} in the README"
