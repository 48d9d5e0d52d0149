"""The FC deployment: s.yaml as the Serverless Devs CLI renders it, and the layers dev/build_layers.py builds."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from aichat.config import ENV_VARS, FALLBACK_KEY_VAR, RUNNER_ENV_VARS, load_settings
from jsonschema import Draft7Validator

from dev import build_layers as layers_tool

ROOT = Path(__file__).resolve().parent.parent
S_YAML = ROOT / "s.yaml"
S_CLI = ROOT / ".tools" / "node_modules" / ".bin" / "s"
FC3_SCHEMA = ROOT.parent / "shared" / "fc3" / "props.schema.json"
BUILD_LAYERS = ROOT / "dev" / "build_layers.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

FUNCTIONS = ("login", "chat")
FC_PYTHON = "/usr/bin/python3"  # custom.debian12: Python 3.11
LAYER_PYTHONPATH = "/opt/python"
ROLES_IN_LAYER = "/opt/python/aichat/roles.json"
SECRET_VARS = ("AICHAT_JWT_SECRET", "AICHAT_DB_URL", "AICHAT_LLM_API_KEY")
CODE_VARS = {*ENV_VARS, FALLBACK_KEY_VAR, *RUNNER_ENV_VARS}

# Dummy deploy-time values; anything s.yaml reads that is not listed here gets "dummy-<NAME>".
DUMMIES = {
    "AICHAT_DEPLOY_REGION": "cn-hangzhou",
    "AICHAT_DEPLOY_LOGIN_ROLE_ARN": "acs:ram::1234567890123456:role/aichat-login",
    "AICHAT_DEPLOY_CODE_LAYER_ARN": "acs:fc:cn-hangzhou:1234567890123456:layers/aichat-code/versions/7",
    "AICHAT_DEPLOY_CHAT_DEPS_LAYER_ARN": "acs:fc:cn-hangzhou:1234567890123456:layers/aichat-deps-chat/versions/3",
    "AICHAT_DEPLOY_LOGIN_DEPS_LAYER_ARN": "acs:fc:cn-hangzhou:1234567890123456:layers/aichat-deps-login/versions/4",
    "AICHAT_DB_URL": "mysql://aichat:dummy-password@rm-dummy.mysql.rds.aliyuncs.com:3306/aichat",
    "AICHAT_JWT_SECRET": "dummy-jwt-secret-" + "x" * 40,
    "AICHAT_SMS_SIGN_NAME": "测试签名",
    "AICHAT_SMS_TEMPLATE_CODE": "SMS_000000000",
    "AICHAT_LLM_API_KEY": "sk-dummy-llm-key",
}
# Every optional deploy-time value set too, so the VPC and log branches are rendered and validated.
FULL_DUMMIES = {
    **DUMMIES,
    "AICHAT_DEPLOY_PREFIX": "aichat-staging",
    "AICHAT_DEPLOY_VPC_ID": "vpc-dummy",
    "AICHAT_DEPLOY_VSWITCH_IDS": "vsw-dummy-a,vsw-dummy-b",
    "AICHAT_DEPLOY_SECURITY_GROUP_ID": "sg-dummy",
    "AICHAT_DEPLOY_LOG_PROJECT": "aichat-logs",
    "AICHAT_DEPLOY_LOG_STORE": "functions",
    "AICHAT_CORS_ORIGINS": "https://app.example,https://admin.example",
    "AICHAT_TEST_ACCOUNT": "off",
    "AICHAT_LOG_LEVEL": "DEBUG",
    "AICHAT_LLM_BASE_URL": "https://llm.example/v1",
    "AICHAT_LLM_MODEL": "dummy-model",
    "AICHAT_LLM_VISION_MODEL": "dummy-vision-model",
    "AICHAT_WEATHER_PROVIDER": "qweather",
    "AICHAT_AMAP_KEY": "dummy-amap-key",
    "AICHAT_QWEATHER_BASE_URL": "https://dummy.re.qweatherapi.com",
    "AICHAT_QWEATHER_KEY": "dummy-qweather-key",
    "AICHAT_NEWS_SOURCES": "toutiao",
    "AICHAT_DEPLOY_CHAT_ROLE_ARN": "acs:ram::1234567890123456:role/aichat-chat-dummy",
    "AICHAT_OSS_BUCKET": "aichat-voice-dummy",
    "AICHAT_TTS_PROVIDER": "cosyvoice",
    "AICHAT_REDIS_URL": "rediss://:dummy-password@r-dummy.redis.rds.aliyuncs.com:6380/0",
}
ENV_CALL = re.compile(r"""env\(\s*['"]([A-Za-z0-9_]+)['"]\s*(,)?""")


def env_names() -> dict[str, bool]:
    """Every variable s.yaml reads with ${env(...)}, mapped to whether it has a default."""
    names: dict[str, bool] = {}
    for name, comma in ENV_CALL.findall(S_YAML.read_text(encoding="utf-8")):
        names[name] = names.get(name, False) or bool(comma)
    return names


def need(path: Path, what: str) -> None:
    """Skip a test when a prerequisite is missing locally; in CI a missing prerequisite is a failure."""
    if path.exists():
        return
    if IN_CI:
        pytest.fail(f"{what} is missing: {path} (CI=true; `make test` installs it)")
    pytest.skip(f"{what} is missing: {path}")


def render(tmp: Path, values: dict[str, str]) -> dict[str, Any]:
    """s.yaml as the Serverless Devs CLI resolves it (`s preview -o json`), with only `values` in the environment."""
    need(S_CLI, "the Serverless Devs CLI (make tools)")
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
    env.update({name: values.get(name, f"dummy-{name}") for name, optional in env_names().items() if not optional})
    env.update({name: value for name, value in values.items() if name in env_names()})
    result = subprocess.run(
        [str(S_CLI), "preview", "-t", str(S_YAML), "-o", "json", "--silent"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"s preview failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """s.yaml rendered with dummies for the required values only (every default in force)."""
    return render(tmp_path_factory.mktemp("render"), DUMMIES)


@pytest.fixture(scope="module")
def rendered_full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """s.yaml rendered with every value it reads set."""
    return render(tmp_path_factory.mktemp("render-full"), FULL_DUMMIES)


def props_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """One fc3 resource's props."""
    resource = doc["resources"][name]
    assert resource["component"] == "fc3"
    return resource["props"]


def env_of(doc: dict[str, Any], name: str) -> dict[str, str]:
    """One function's environment variables."""
    return props_of(doc, name)["environmentVariables"]


def health_path(function: str) -> str:
    """The health check path s.yaml gives a function (a literal there, so no rendering is needed)."""
    raw = yaml.safe_load(S_YAML.read_text(encoding="utf-8"))
    return raw["resources"][function]["props"]["customRuntimeConfig"]["healthCheckConfig"]["httpGetUrl"]


def build_layers(*args: str) -> subprocess.CompletedProcess:
    """Run dev/build_layers.py with this interpreter."""
    return subprocess.run(
        [sys.executable, str(BUILD_LAYERS), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def code_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code layer zip, built into a temporary folder."""
    out = tmp_path_factory.mktemp("layers")
    result = build_layers("--code-only", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "aichat-code.zip"


# --- s.yaml, rendered by the CLI and checked against fc3's own schema ---


def test_both_functions_and_nothing_else(rendered):
    assert rendered["edition"] == "3.0.0"
    assert sorted(rendered["resources"]) == sorted(FUNCTIONS)


@pytest.mark.parametrize("fixture", ["rendered", "rendered_full"])
@pytest.mark.parametrize("function", FUNCTIONS)
def test_props_match_the_fc3_schema(request, fixture, function):
    need(FC3_SCHEMA, "the fc3 props schema (../shared/fc3)")
    schema = json.loads(FC3_SCHEMA.read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(props_of(request.getfixturevalue(fixture), function)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("function", FUNCTIONS)
def test_web_function_shape(rendered, function):
    props = props_of(rendered, function)
    assert props["runtime"] == "custom.debian12"  # its Python 3.11 is supported (3.10's life ended 2026-10)
    assert props["functionName"] == f"aichat-{function}"
    assert props["region"] == DUMMIES["AICHAT_DEPLOY_REGION"]
    code = ROOT / props["code"]
    assert code.resolve() == (ROOT / "functions" / function).resolve() and (code / "app.py").is_file()
    assert re.search(r"^app = ", (code / "app.py").read_text(), re.MULTILINE), "app.py must define `app`"
    runtime = props["customRuntimeConfig"]
    assert runtime["port"] == 9000
    env = env_of(rendered, function)
    assert env["PYTHONPATH"] == LAYER_PYTHONPATH
    assert str(Path(FC_PYTHON).parent) in env["PATH"].split(":")
    deps = DUMMIES[f"AICHAT_DEPLOY_{function.upper()}_DEPS_LAYER_ARN"]
    assert props["layers"] == [DUMMIES["AICHAT_DEPLOY_CODE_LAYER_ARN"], deps]  # each function its own deps


@pytest.mark.parametrize("function", FUNCTIONS)
def test_start_command_is_the_local_one(rendered, function, monkeypatch):
    from dev import run

    started: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(run.subprocess, "Popen", lambda argv, cwd, env: started.append((argv, cwd)))
    run.serve(function, 9999, {})
    ((local_argv, local_cwd),) = started
    runtime = props_of(rendered, function)["customRuntimeConfig"]
    # Same module, config and app strings as `make run`; only the interpreter is the runtime's Python 3.11.
    assert runtime["command"] + runtime["args"] == [FC_PYTHON, *local_argv[1:]]
    assert Path(local_cwd).resolve() == (ROOT / props_of(rendered, function)["code"]).resolve()


@pytest.mark.parametrize("function", FUNCTIONS)
def test_health_check_and_lifecycle_settings(rendered, function):
    props = props_of(rendered, function)
    health = props["customRuntimeConfig"]["healthCheckConfig"]
    assert health["httpGetUrl"].startswith("/")
    assert 1 <= health["timeoutSeconds"] <= 3
    assert health["periodSeconds"] >= 1 and health["initialDelaySeconds"] >= 0
    assert health["failureThreshold"] >= 1 and health["successThreshold"] >= 1
    hooks = props["instanceLifecycleConfig"]
    assert hooks["initializer"]["handler"] and 1 <= hooks["initializer"]["timeout"] <= 300
    assert hooks["preStop"]["handler"] and 1 <= hooks["preStop"]["timeout"] <= 90


@pytest.mark.parametrize("function", FUNCTIONS)
def test_resources_follow_fc_rules(rendered, function):
    props = props_of(rendered, function)
    cpu, memory = props["cpu"], props["memorySize"]
    assert math.isclose(round(cpu / 0.05) * 0.05, cpu) and 0.05 <= cpu <= 16
    assert memory % 64 == 0
    # FC 3.0: vCPU : memory (GB) must lie between 1:1 and 1:4.
    assert 1 <= (memory / 1024) / cpu <= 4
    assert props["diskSize"] in (512, 10240)
    assert 1 <= props["instanceConcurrency"] <= 200
    env = env_of(rendered, function)
    threads = int(env.get("AICHAT_WORKERS", "1")) * int(env["AICHAT_THREADS"])
    # Spare threads beyond instanceConcurrency, so health checks never queue behind long streams.
    assert threads > props["instanceConcurrency"]


def test_timeouts_fit_each_service(rendered):
    assert props_of(rendered, "login")["timeout"] <= 60
    # Long streamed replies: well beyond the upstream read timeout and gunicorn's worker timeout.
    assert props_of(rendered, "chat")["timeout"] >= 300
    assert props_of(rendered, "chat")["instanceConcurrency"] > props_of(rendered, "login")["instanceConcurrency"]


@pytest.mark.parametrize("function", FUNCTIONS)
def test_anonymous_http_trigger_with_preflight(rendered, function):
    (trigger,) = props_of(rendered, function)["triggers"]
    assert trigger["triggerType"] == "http"
    assert trigger["triggerConfig"]["authType"] == "anonymous"
    assert {"GET", "POST", "OPTIONS"} <= set(trigger["triggerConfig"]["methods"])


def test_voice_store_follows_the_bucket(rendered, rendered_full):
    for function in FUNCTIONS:
        assert env_of(rendered, function)["AICHAT_AUDIO_STORE"] == "local"  # no bucket: the instance's disk
        full = env_of(rendered_full, function)
        assert full["AICHAT_AUDIO_STORE"] == "oss" and full["AICHAT_OSS_BUCKET"] == "aichat-voice-dummy"
        assert full["AICHAT_OSS_ENDPOINT"] == f"https://oss-{full['AICHAT_OSS_REGION']}-internal.aliyuncs.com"
    assert props_of(rendered_full, "chat")["role"] == FULL_DUMMIES["AICHAT_DEPLOY_CHAT_ROLE_ARN"]


def test_login_role_and_optional_network(rendered, rendered_full):
    assert props_of(rendered, "login")["role"] == DUMMIES["AICHAT_DEPLOY_LOGIN_ROLE_ARN"]
    for function in FUNCTIONS:
        # Unset, the VPC and log settings are fc3's own empty ("none") config.
        assert props_of(rendered, function)["vpcConfig"] == {"vpcId": "", "vSwitchIds": [], "securityGroupId": ""}
        assert props_of(rendered, function)["logConfig"]["project"] == ""
        full = props_of(rendered_full, function)
        assert full["functionName"] == f"aichat-staging-{function}"
        assert full["vpcConfig"] == {
            "vpcId": "vpc-dummy",
            "vSwitchIds": ["vsw-dummy-a", "vsw-dummy-b"],
            "securityGroupId": "sg-dummy",
        }
        assert full["logConfig"]["project"] == "aichat-logs" and full["logConfig"]["enableRequestMetrics"] is True


@pytest.mark.parametrize("function", FUNCTIONS)
def test_env_vars_are_ones_the_code_reads(rendered_full, function):
    env = env_of(rendered_full, function)
    ours = [name for name in env if name.startswith(("AICHAT_", "ALIBABA_CLOUD_", "DASHSCOPE_"))]
    assert ours and not sorted(set(ours) - CODE_VARS)
    assert not [name for name in env if name.startswith("ALIBABA_CLOUD_")], "FC injects these from the role"
    # FC's rules: letters, digits and underscores, no reserved FC_ prefix, string values, 4 KB in all.
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) and not name.startswith("FC_") for name in env)
    assert all(isinstance(value, str) for value in env.values())
    assert len(json.dumps(env, ensure_ascii=False).encode()) < 4096
    assert env["AICHAT_ENV"] == "production" and env["AICHAT_TRUST_PROXY"] == "1"


def test_service_specific_settings(rendered):
    assert env_of(rendered, "login")["AICHAT_SMS_PROVIDER"] == "dysms"
    assert env_of(rendered, "chat")["AICHAT_ROLES_FILE"] == ROLES_IN_LAYER


def test_secrets_only_come_from_the_environment(rendered):
    raw = yaml.safe_load(S_YAML.read_text(encoding="utf-8"))
    for function in FUNCTIONS:
        declared = raw["resources"][function]["props"]["environmentVariables"]
        for name in SECRET_VARS:
            if name in declared:
                assert declared[name] == f"${{env('{name}')}}", f"{function}: {name} must be ${{env('{name}')}}"
                assert env_of(rendered, function)[name] == DUMMIES[name]
    assert all(name in env_of(rendered, "login") or name in env_of(rendered, "chat") for name in SECRET_VARS)
    text = S_YAML.read_text(encoding="utf-8")
    # No AccessKey (LTAI...), model key (sk-...) or credentials in a URL written into the file itself.
    assert not re.search(r"LTAI[0-9A-Za-z]{8,}|\bsk-[0-9A-Za-z]{8,}|://[^/\s:]+:[^@\s]+@", text)


def test_required_values_have_no_defaults():
    names = env_names()
    assert set(names) <= set(FULL_DUMMIES), "give every value s.yaml reads a dummy in FULL_DUMMIES"
    for name in (
        *SECRET_VARS,
        "AICHAT_DEPLOY_REGION",
        "AICHAT_DEPLOY_CODE_LAYER_ARN",
        "AICHAT_DEPLOY_CHAT_DEPS_LAYER_ARN",
        "AICHAT_DEPLOY_LOGIN_DEPS_LAYER_ARN",
    ):
        assert names.get(name) is False, f"{name} must be ${{env('{name}')}} with no default"


@pytest.mark.parametrize("function", ["login", "chat"])
def test_production_settings_are_valid(rendered, function):
    env = {**env_of(rendered, function), "AICHAT_ROLES_FILE": str(ROOT / "template" / "roles.json")}
    settings = load_settings(env, service=function)
    assert settings.is_production and settings.trust_proxy


# --- the layers ---


def test_code_layer_contents(code_layer):
    with zipfile.ZipFile(code_layer) as archive:
        names = archive.namelist()
        roles = archive.read("python/aichat/roles.json")
        infos = archive.infolist()
    source = ROOT / "layers" / "common" / "python" / "aichat"
    sources = [p.relative_to(source) for p in source.rglob("*") if p.is_file()]
    expected = {f"python/aichat/{p.as_posix()}" for p in sources if "__pycache__" not in p.parts and p.suffix != ".pyc"}
    expected |= {"python/aichat/roles.json"}
    assert expected == {n for n in names if not n.endswith("/")}
    assert roles == (ROOT / "template" / "roles.json").read_bytes()
    assert names == sorted(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos if not i.is_dir()} == {0o100644}


def test_code_layer_is_reproducible(code_layer, tmp_path):
    again = build_layers("--code-only", "--out", str(tmp_path))
    assert again.returncode == 0, again.stdout + again.stderr
    digest = hashlib.sha256((tmp_path / "aichat-code.zip").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(code_layer.read_bytes()).hexdigest()
    assert digest in again.stdout


@pytest.mark.parametrize(
    ("tag", "fits"),
    [
        ("py3-none-any", True),
        ("py2.py3-none-any", True),
        ("cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64", True),
        ("cp39-abi3-manylinux2014_x86_64", True),
        ("cp310-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64", True),
        ("cp310-cp310-manylinux2014_x86_64", False),
        ("cp312-cp312-manylinux2014_x86_64", False),
        ("cp312-abi3-manylinux2014_x86_64", False),
        ("cp311-cp311-manylinux2014_aarch64", False),
        ("cp311-cp311-musllinux_1_2_x86_64", False),
        ("cp311-cp311-macosx_11_0_arm64", False),
        ("cp311-cp311-win_amd64", False),
    ],
)
def test_wheel_tags_for_fc(tag, fits):
    assert layers_tool.tag_fits(tag) is fits


def elf(machine: int) -> bytes:
    """The first bytes of a 64-bit little-endian ELF shared object for one e_machine."""
    return b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + (3).to_bytes(2, "little") + machine.to_bytes(2, "little")


def test_deps_check_refuses_foreign_binaries(tmp_path):
    good = tmp_path / "good"
    (good / "ok-1.0.dist-info").mkdir(parents=True)
    (good / "ok-1.0.dist-info" / "WHEEL").write_text("Wheel-Version: 1.0\nTag: cp311-cp311-manylinux2014_x86_64\n")
    (good / "ok").mkdir()
    (good / "ok" / "_speedups.cpython-311-x86_64-linux-gnu.so").write_bytes(elf(62))
    (good / "ok" / "_rust.abi3.so").write_bytes(elf(62))
    layers_tool.check_target_abi(good)

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "ok-1.0.dist-info" / "WHEEL").write_text("Wheel-Version: 1.0\nTag: cp312-cp312-manylinux2014_x86_64\n")
    (bad / "ok" / "_speedups.cpython-312-x86_64-linux-gnu.so").write_bytes(elf(62))
    (bad / "ok" / "_arm.abi3.so").write_bytes(elf(183))
    with pytest.raises(layers_tool.BuildError) as caught:
        layers_tool.check_target_abi(bad)
    message = str(caught.value)
    assert "ok-1.0.dist-info" in message and "cpython-312" in message and "_arm.abi3.so" in message


FAKE_S = """#!{python}
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
name = args[args.index("--layer-name") + 1]
print("[WARN] noise before the result")
print(json.dumps({{"publish": {{"layerVersionArn": "acs:fc:cn-shanghai:1234567890:layers/" + name + "/versions/9"}}}}))
"""


def test_publish_records_layer_arns_once(code_layer, tmp_path, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "s"
    fake.write_text(FAKE_S.format(python=sys.executable, calls=str(calls)))
    fake.chmod(0o755)
    deps = tmp_path / "aichat-deps-chat.zip"
    deps.write_bytes(b"not really a zip")
    monkeypatch.setenv("S_CLI", str(fake))
    monkeypatch.setenv("AICHAT_DEPLOY_REGION", "cn-shanghai")
    monkeypatch.setenv("AICHAT_DEPLOY_PREFIX", "aichat-staging")
    zips = {"AICHAT_DEPLOY_CODE_LAYER_ARN": code_layer, "AICHAT_DEPLOY_CHAT_DEPS_LAYER_ARN": deps}

    arns = layers_tool.publish(zips, tmp_path)
    assert arns == {
        "AICHAT_DEPLOY_CODE_LAYER_ARN": "acs:fc:cn-shanghai:1234567890:layers/aichat-staging-code/versions/9",
        "AICHAT_DEPLOY_CHAT_DEPS_LAYER_ARN": "acs:fc:cn-shanghai:1234567890:layers/aichat-staging-deps-chat/versions/9",
    }
    assert (tmp_path / "arns.env").read_text() == "".join(f"{k}={v}\n" for k, v in sorted(arns.items()))
    first = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [call[:4] for call in first] == [["cli", "fc3", "layer", "publish"]] * 2
    for call, zip_path in zip(first, zips.values(), strict=True):
        assert call[call.index("--code") + 1] == str(zip_path)
        assert call[call.index("--compatible-runtime") + 1] == "custom.debian12"
        assert call[call.index("--region") + 1] == "cn-shanghai"
    # The same bytes are not published again: the ledger answers.
    assert layers_tool.publish(zips, tmp_path) == arns
    assert len(calls.read_text().splitlines()) == 2


IMPORT_PROBE = r"""
import json, os, sys
sys.path[0:0] = [os.getcwd(), sys.argv[1]]
import aichat, app
client = app.app.test_client()
print(json.dumps({
    "aichat": aichat.__file__,
    "app": app.__file__,
    "path": sys.path,
    "routes": [[rule.rule, sorted(rule.methods)] for rule in app.app.url_map.iter_rules()],
    "health": client.get(sys.argv[2]).status_code,
    "initialize": client.post("/initialize", headers={"x-fc-control-path": "/initialize"}).status_code,
    "pre_stop": client.get("/pre-stop", headers={"x-fc-control-path": "/pre-stop"}).status_code,
    "initialize_public": client.post("/initialize").status_code,
    "pre_stop_public": client.get("/pre-stop").status_code,
}))
"""


@pytest.fixture(scope="module")
def imported(code_layer, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Each service imported from the unpacked code layer alone (plus installed packages), as FC would."""
    opt = tmp_path_factory.mktemp("opt")
    with zipfile.ZipFile(code_layer) as archive:
        archive.extractall(opt)
    results = {}
    for function in FUNCTIONS:
        # The function folder as FC unpacks it to /code (the working directory of the start command).
        code = tmp_path_factory.mktemp(f"code-{function}") / "code"
        shutil.copytree(ROOT / "functions" / function, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AICHAT_JWT_SECRET": "s" * 40,
            "AICHAT_DB_URL": f"sqlite:///{code / 'aichat.db'}",
            "AICHAT_ROLES_FILE": str(opt / "python" / "aichat" / "roles.json"),
            "AICHAT_LOG_LEVEL": "WARNING",
        }
        # -I: no PYTHONPATH, no user site and no script/cwd entry, so nothing from the repo sneaks in.
        result = subprocess.run(
            [sys.executable, "-I", "-c", IMPORT_PROBE, str(opt / "python"), health_path(function)],
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{function} did not import from the layer:\n{result.stderr}"
        results[function] = {**json.loads(result.stdout.strip().splitlines()[-1]), "opt": opt, "code": code}
    return results


@pytest.mark.parametrize("function", FUNCTIONS)
def test_services_import_from_the_code_layer_alone(imported, function):
    info = imported[function]
    assert Path(info["aichat"]).resolve().is_relative_to(info["opt"].resolve())
    assert Path(info["app"]).resolve().is_relative_to(info["code"].resolve())
    venv = (ROOT / ".venv").resolve()
    leaked = [
        p
        for p in info["path"]
        if p and Path(p).resolve().is_relative_to(ROOT) and not Path(p).resolve().is_relative_to(venv)
    ]
    assert not leaked, f"repo paths on sys.path: {leaked}"


@pytest.mark.parametrize("function", FUNCTIONS)
def test_health_check_and_hooks_are_served(imported, rendered, function):
    info = imported[function]
    routes = {(rule, method) for rule, methods in info["routes"] for method in methods}
    health = props_of(rendered, function)["customRuntimeConfig"]["healthCheckConfig"]["httpGetUrl"]
    assert health == health_path(function)
    assert (health, "GET") in routes and info["health"] == 200
    assert ("/initialize", "POST") in routes and info["initialize"] == 200
    assert ("/pre-stop", "GET") in routes and info["pre_stop"] == 200
    # Through the public trigger (no FC control path) they are like any unknown path.
    assert info["initialize_public"] == info["pre_stop_public"] == 404


@pytest.mark.skipif(
    os.environ.get("AICHAT_TEST_DEPS_LAYER") != "1" and not IN_CI,
    reason="set AICHAT_TEST_DEPS_LAYER=1 (builds both deps layers from the locks, ~1.5 min; CI always does)",
)
def test_the_layers_as_built_serve_on_the_runtimes_python(tmp_path):
    """`make layer`'s zips, unzipped as FC mounts them, run the functions on this Python 3.11 with nothing
    else on the path (-S: no site-packages, so not the test venv): what ships is what was tested."""
    result = build_layers("--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sys.version_info[:2] == (3, 11)  # the runtime's minor version (custom.debian12)
    for function in FUNCTIONS:
        opt = tmp_path / function
        for name in ("aichat-code.zip", f"aichat-deps-{function}.zip"):
            with zipfile.ZipFile(tmp_path / "out" / name) as archive:
                archive.extractall(opt)
        names = {p.name.split(".")[0] for p in (opt / "python").iterdir()}
        assert ("alibabacloud_dysmsapi20170525" in names) is (function == "login")  # chat ships no SDK
        assert "argon2" in names if function == "login" else "lameenc" in names
        env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(opt / "python"),
            "AICHAT_ENV": "test",
            "AICHAT_JWT_SECRET": "x" * 40,
            "AICHAT_DB_URL": f"sqlite:///{tmp_path / function}.db",
            "AICHAT_ROLES_FILE": str(opt / "python" / "aichat" / "roles.json"),
        }
        probe = (
            "import json, sys\nimport app\nclient = app.app.test_client()\n"
            f"path = {'/health' if function == 'login' else '/chat/roles'!r}\n"
            "print(json.dumps({'python': list(sys.version_info[:2]), 'status': client.get(path).status_code,"
            " 'sdk': any(m.startswith('alibabacloud') for m in sys.modules)}))"
        )
        run = subprocess.run(
            [sys.executable, "-S", "-c", probe],
            cwd=ROOT / "functions" / function,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        answer = json.loads(run.stdout.strip().splitlines()[-1])
        assert answer == {"python": [3, 11], "status": 200, "sdk": False}, answer
    # The same locks give the same bytes again.
    again = build_layers("--out", str(tmp_path / "again"))
    assert again.returncode == 0
    for name in ("aichat-code.zip", "aichat-deps-chat.zip", "aichat-deps-login.zip"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


@pytest.mark.skipif(
    os.environ.get("AICHAT_TEST_DEPS_LAYER") != "1", reason="set AICHAT_TEST_DEPS_LAYER=1 (network, ~1 min)"
)
def test_deps_layer_builds_for_fc(tmp_path):
    result = build_layers("--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(tmp_path / "aichat-deps-login.zip") as archive:
        names = archive.namelist()
    tops = {n.split("/")[1] for n in names if n.count("/") >= 2}
    for package in ("flask", "gunicorn", "jwt", "pymysql", "requests", "urllib3", "alibabacloud_dysmsapi20170525"):
        assert package in tops, f"{package} missing from the deps layer"
    assert "aichat" not in tops and "bin" not in tops
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
