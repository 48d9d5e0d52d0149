"""Build the two FC layer zips reproducibly (`python dev/build_layers.py [--code-only] [--publish]`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "layers" / "common" / "python" / "aichat"
ROLES_FILE = ROOT / "template" / "roles.json"
REQUIREMENTS = ROOT / "requirements.txt"
DEFAULT_OUT = ROOT / "build" / "layers"
CODE_ZIP = "aichat-code.zip"
DEPS_ZIP = "aichat-deps.zip"

# FC's custom.debian10 runtime: CPython 3.10 on Linux x86_64 with glibc 2.28.
TARGET_PYTHON = "3.10"
TARGET_ABI = "cp310"
TARGET_PLATFORM = "manylinux2014_x86_64"
TARGET_FLAGS = (
    "--platform",
    TARGET_PLATFORM,
    "--python-version",
    TARGET_PYTHON,
    "--implementation",
    "cp",
)
COMPATIBLE_RUNTIME = "custom.debian10"
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")

# The oldest date a zip can store: with it, a rebuild of the same files gives the same bytes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o100644
DIR_MODE = 0o040755
PURE_WHEEL = re.compile(r"-(py3|py2\.py3)-none-any\.whl$")
LAYER_ARN = re.compile(r"acs:fc:[a-z0-9-]+:[0-9]+:layers/[A-Za-z0-9_-]+/versions/[0-9]+")


class BuildError(RuntimeError):
    """A layer cannot be built as FC needs it."""


def skipped(path: Path) -> bool:
    """Whether a file is build debris that never belongs in a layer."""
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")


def write_zip(zip_path: Path, files: dict[str, Path]) -> None:
    """Write `files` (archive name -> source file) as a zip whose bytes depend only on names and contents."""
    # Explicit directory entries, so every folder FC unpacks gets fixed permissions too.
    dirs = {"/".join(name.split("/")[:depth]) + "/" for name in files for depth in range(1, name.count("/") + 1)}
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(dirs | set(files)):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = 3  # Unix, so the permission bits below are honoured when FC unpacks
            if name.endswith("/"):
                info.external_attr = (DIR_MODE << 16) | 0x10
                archive.writestr(info, b"")
            else:
                info.external_attr = FILE_MODE << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, files[name].read_bytes(), compresslevel=9)
    tmp.replace(zip_path)


def tree_files(base: Path, prefix: str, exclude_top: Iterable[str] = ()) -> dict[str, Path]:
    """Every regular file under `base` as archive name -> path, without caches or excluded top-level dirs."""
    files: dict[str, Path] = {}
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if rel.parts[0] in exclude_top or skipped(rel) or not path.is_file():
            continue
        files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def build_code_layer(out: Path) -> Path:
    """Zip the aichat package plus the bundled role catalogue as python/aichat/** (mounted at /opt/python)."""
    files = tree_files(PACKAGE_DIR, "python/aichat")
    roles_name = "python/aichat/roles.json"
    if roles_name in files:
        raise BuildError(f"{PACKAGE_DIR}/roles.json would shadow template/roles.json; remove one of them")
    files[roles_name] = ROLES_FILE
    zip_path = out / CODE_ZIP
    write_zip(zip_path, files)
    return zip_path


def pip(*args: str) -> None:
    """Run this interpreter's pip quietly, failing the build when it fails."""
    subprocess.run([*PIP, *args, "--quiet"], check=True)


def resolve(report: Path, *extra: str) -> dict[str, str]:
    """The distributions pip would install for requirements.txt, as canonical name -> version."""
    pip("install", "--dry-run", "--ignore-installed", "--report", str(report), *extra, "-r", str(REQUIREMENTS))
    data = json.loads(report.read_text())
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}


def canonical(name: str) -> str:
    """A distribution name in PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_for_sdist_only(work: Path, wheelhouse: Path) -> dict[str, str]:
    """Build pure-Python wheels for packages whose current release FC's Python can only get as an sdist.

    A binary-only resolution would silently fall back to an older release of such a package (e.g.
    alibabacloud-tea, published as sdist only), so the layer would differ from what the tests run.
    """
    current = resolve(work / "host.json")
    binary_only = resolve(work / "target.json", *TARGET_FLAGS, "--only-binary=:all:")
    built: dict[str, str] = {}
    for name, version in sorted(current.items()):
        # Same release either way, or a package Python 3.10 does not need at all.
        if binary_only.get(name, version) == version:
            continue
        probe = work / "probe" / name
        # --no-deps is what lets pip consider sdists while still checking Requires-Python for 3.10.
        found = subprocess.run(
            [*PIP, "download", "--quiet", "--no-deps", *TARGET_FLAGS, "-d", str(probe), f"{name}=={version}"],
            capture_output=True,
            text=True,
        )
        sdists = [p for p in probe.glob("*") if p.name.endswith((".tar.gz", ".zip"))] if probe.exists() else []
        if found.returncode != 0 or not sdists:
            print(f"  {name}: {version} does not fit Python {TARGET_PYTHON}; the layer gets {binary_only[name]}")
            continue
        before = set(wheelhouse.glob("*.whl"))
        pip("wheel", "--no-deps", "-w", str(wheelhouse), str(sdists[0]))
        new = sorted(set(wheelhouse.glob("*.whl")) - before)
        impure = [w.name for w in new if not PURE_WHEEL.search(w.name)]
        if impure:
            for wheel in new:
                wheel.unlink()
            print(
                f"  {name}: {version} builds a binary wheel ({', '.join(impure)}); the layer gets {binary_only[name]}"
            )
            continue
        built[name] = version
        print(f"  {name}: {version} is sdist-only; built a pure-Python wheel")
    return built


def check_target_abi(site: Path) -> None:
    """Refuse a deps tree holding anything that cannot load in FC's CPython 3.10 on Linux x86_64."""
    problems: list[str] = []
    for wheel_meta in sorted(site.glob("*.dist-info/WHEEL")):
        tags = [
            line.split(":", 1)[1].strip() for line in wheel_meta.read_text().splitlines() if line.startswith("Tag:")
        ]
        if not any(tag_fits(tag) for tag in tags):
            problems.append(f"{wheel_meta.parent.name}: wheel tags {tags}")
    for path in sorted(site.rglob("*")):
        if not path.is_file() or not (path.name.endswith(".so") or ".so." in path.name):
            continue
        rel = path.relative_to(site)
        if ".cpython-" in path.name and f".cpython-{TARGET_ABI[2:]}-x86_64-linux-gnu.so" not in path.name:
            problems.append(f"{rel}: extension module for another interpreter")
        with path.open("rb") as handle:
            header = handle.read(20)
        # ELF magic, 64-bit class, and e_machine 62 (EM_X86_64), little-endian.
        if header[:4] != b"\x7fELF" or header[4] != 2 or int.from_bytes(header[18:20], "little") != 62:
            problems.append(f"{rel}: not a Linux x86_64 shared object")
    if problems:
        raise BuildError("deps layer has wrong-platform binaries:\n  " + "\n  ".join(problems))


def tag_fits(tag: str) -> bool:
    """Whether a wheel tag (python-abi-platform, each part maybe a dotted set) loads in CPython 3.10 on x86_64."""
    try:
        pythons, abis, platforms = (part.split(".") for part in tag.split("-"))
    except ValueError:
        return False
    # glibc manylinux builds only: musllinux and plain linux_* wheels do not promise to load on Debian 10.
    if not any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in platforms):
        return False
    for python in pythons:
        for abi in abis:
            if abi == "none" and python in ("py3", "py310", "cp310"):
                return True
            if abi == TARGET_ABI and python == TARGET_ABI:
                return True
            # The stable ABI: a cp3X-abi3 wheel loads on any CPython >= 3.X.
            if abi == "abi3" and re.fullmatch(r"cp3(\d+)", python) and int(python[3:]) <= int(TARGET_ABI[3:]):
                return True
    return False


def build_deps_layer(out: Path) -> Path:
    """Install requirements.txt for FC's Python 3.10 (binary wheels only) and zip it as python/**."""
    staging = out / "deps"
    site = staging / "python"
    wheelhouse = out / "deps-wheels"
    for path in (staging, wheelhouse):
        shutil.rmtree(path, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="aichat-deps-") as work:
        wheels_for_sdist_only(Path(work), wheelhouse)
    pip(
        "install",
        "--no-compile",
        "--target",
        str(site),
        *TARGET_FLAGS,
        "--only-binary=:all:",
        "--find-links",
        str(wheelhouse),
        "-r",
        str(REQUIREMENTS),
    )
    check_target_abi(site)
    # Console scripts carry this machine's interpreter path in their shebang; FC runs `python -m gunicorn`.
    files = tree_files(site, "python", exclude_top=("bin",))
    zip_path = out / DEPS_ZIP
    write_zip(zip_path, files)
    return zip_path


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def publish(zips: dict[str, Path], out: Path) -> dict[str, str]:
    """Publish each zip as a new layer version (unless this exact zip is already published) and record the ARNs."""
    region = os.environ.get("AICHAT_DEPLOY_REGION")
    if not region:
        raise BuildError("set AICHAT_DEPLOY_REGION to publish layers (see docs/deploy.md)")
    prefix = os.environ.get("AICHAT_DEPLOY_PREFIX", "aichat")
    access = os.environ.get("AICHAT_DEPLOY_ACCESS", "default")
    s_cli = os.environ.get("S_CLI", str(ROOT / ".tools" / "node_modules" / ".bin" / "s"))
    ledger_path = out / "published.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    arns: dict[str, str] = {}
    for env_name, zip_path in zips.items():
        layer = f"{prefix}-{zip_path.stem.removeprefix('aichat-')}"
        digest = sha256(zip_path)
        key = f"{region}/{layer}/{digest}"
        if key not in ledger:
            result = subprocess.run(
                [
                    *(s_cli, "cli", "fc3", "layer", "publish", "--region", region, "--layer-name", layer),
                    *("--code", str(zip_path), "--compatible-runtime", COMPATIBLE_RUNTIME),
                    *("--description", f"sha256:{digest[:16]}", "-a", access, "-o", "json", "--silent"),
                ],
                capture_output=True,
                text=True,
            )
            found = LAYER_ARN.search(result.stdout)
            if result.returncode != 0 or not found:
                raise BuildError(f"s layer publish {layer} failed:\n{result.stdout}{result.stderr}")
            ledger[key] = found.group(0)
            ledger_path.write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")
        arns[env_name] = ledger[key]
        print(f"{env_name}={arns[env_name]}")
    (out / "arns.env").write_text("".join(f"{k}={v}\n" for k, v in sorted(arns.items())))
    return arns


def main(argv: list[str] | None = None) -> int:
    """Build the code layer and (unless --code-only) the deps layer; optionally publish them."""
    parser = argparse.ArgumentParser(prog="python dev/build_layers.py", description=__doc__)
    parser.add_argument("--code-only", action="store_true", help="build only aichat-code.zip (fast, offline)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: build/layers)")
    parser.add_argument(
        "--publish",
        action="store_true",
        help="publish the built zips with the Serverless Devs CLI and write <out>/arns.env",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        zips = {"AICHAT_DEPLOY_CODE_LAYER_ARN": build_code_layer(out)}
        if not args.code_only:
            zips["AICHAT_DEPLOY_DEPS_LAYER_ARN"] = build_deps_layer(out)
        for path in zips.values():
            print(f"{path}  {path.stat().st_size} bytes  sha256 {sha256(path)}")
        if args.publish:
            publish(zips, out)
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
