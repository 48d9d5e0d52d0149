"""Build the FC layer zips reproducibly (`python dev/build_layers.py [--code-only] [--publish]`): the code
layer (the aichat package) and one dependency layer per function, installed from its hash-locked list."""

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
DEFAULT_OUT = ROOT / "build" / "layers"
CODE_ZIP = "aichat-code.zip"
# Each function gets only the dependencies it imports (chat: no Alibaba Cloud SDK), pinned with hashes.
LOCKS = {"chat": ROOT / "layers" / "deps" / "chat.lock", "login": ROOT / "layers" / "deps" / "login.lock"}
DEPS_ZIPS = {name: f"aichat-deps-{name}.zip" for name in LOCKS}
DEPS_ARN_VARS = {name: f"AICHAT_DEPLOY_{name.upper()}_DEPS_LAYER_ARN" for name in LOCKS}

# FC's custom.debian12 runtime: CPython 3.11 (/usr/bin/python3) on Linux x86_64 with glibc 2.36.
TARGET_PYTHON = "3.11"
TARGET_ABI = "cp311"
# Debian 12 has glibc 2.36, so any manylinux wheel up to that loads; pip does not infer the older tags from
# a newer one, so each is named (argon2-cffi-bindings 26 ships manylinux_2_26 only, for instance).
TARGET_PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in (17, 26, 27, 28, 31, 34, 35, 36))
TARGET_FLAGS = (
    *(flag for platform in ("manylinux2014_x86_64", *TARGET_PLATFORMS) for flag in ("--platform", platform)),
    "--python-version",
    TARGET_PYTHON,
    "--implementation",
    "cp",
)
COMPATIBLE_RUNTIME = "custom.debian12"
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


def lock_blocks(lock: Path) -> list[str]:
    """The requirement entries of a pip-compile lock, each with its --hash lines (comments dropped)."""
    blocks: list[str] = []
    current: list[str] = []
    for line in lock.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith((" ", "\t")) and current:
            blocks.append(" ".join(current))
            current = []
        current.append(stripped.rstrip("\\").strip())
    if current:
        blocks.append(" ".join(current))
    return [block for block in blocks if "==" in block]


def fetch_wheels(lock: Path, wheelhouse: Path, work: Path) -> None:
    """Every locked distribution as a wheel for the target, each checked against its locked hashes.

    A release published as an sdist only (alibabacloud-tea) is downloaded as that sdist (hash-checked)
    and built into a pure-Python wheel; a build that is not pure fails: FC could not load it.
    """
    for index, block in enumerate(lock_blocks(lock)):
        req = work / f"req-{index}.txt"
        req.write_text(block + "\n")
        binary = subprocess.run(
            [
                *PIP,
                "download",
                "--quiet",
                "--no-deps",
                "--require-hashes",
                "--only-binary=:all:",
                *TARGET_FLAGS,
                "-d",
                str(wheelhouse),
                "-r",
                str(req),
            ],
            capture_output=True,
            text=True,
        )
        if binary.returncode == 0:
            continue
        sdists = work / f"sdist-{index}"
        pip("download", "--no-deps", "--require-hashes", "--no-binary=:all:", "-d", str(sdists), "-r", str(req))
        before = set(wheelhouse.glob("*.whl"))
        for sdist in sorted(sdists.iterdir()):
            pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse), str(sdist))
        impure = [w.name for w in set(wheelhouse.glob("*.whl")) - before if not PURE_WHEEL.search(w.name)]
        if impure:
            raise BuildError(f"{block.split()[0]} has no wheel for Python {TARGET_PYTHON} and builds a binary one")
        print(f"  {block.split()[0]}: sdist only; built a pure-Python wheel from the locked sdist")


def check_target_abi(site: Path) -> None:
    """Refuse a deps tree holding anything that cannot load in FC's CPython 3.11 on Linux x86_64."""
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
    """Whether a wheel tag (python-abi-platform, each part maybe a dotted set) loads in CPython 3.11 on x86_64."""
    try:
        pythons, abis, platforms = (part.split(".") for part in tag.split("-"))
    except ValueError:
        return False
    # glibc manylinux builds only: musllinux and plain linux_* wheels do not promise to load on Debian 12.
    if not any(p == "any" or (p.startswith("manylinux") and p.endswith("_x86_64")) for p in platforms):
        return False
    for python in pythons:
        for abi in abis:
            if abi == "none" and python in ("py3", f"py{TARGET_ABI[2:]}", TARGET_ABI):
                return True
            if abi == TARGET_ABI and python == TARGET_ABI:
                return True
            # The stable ABI: a cp3X-abi3 wheel loads on any CPython >= 3.X.
            if abi == "abi3" and re.fullmatch(r"cp3(\d+)", python) and int(python[3:]) <= int(TARGET_ABI[3:]):
                return True
    return False


def build_deps_layer(out: Path, function: str) -> Path:
    """Install one function's locked dependencies for FC's Python 3.11 (wheels only) and zip them as python/**."""
    staging = out / f"deps-{function}"
    site = staging / "python"
    wheelhouse = out / f"deps-{function}-wheels"
    for path in (staging, wheelhouse):
        shutil.rmtree(path, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="aichat-deps-") as work:
        fetch_wheels(LOCKS[function], wheelhouse, Path(work))
    wheels = sorted(str(w) for w in wheelhouse.glob("*.whl"))
    # Every wheel is a locked, hash-checked file: installed as they are, nothing resolved again.
    pip(
        "install",
        "--no-compile",
        "--no-deps",
        "--no-index",
        "--target",
        str(site),
        *TARGET_FLAGS,
        "--only-binary=:all:",
        *wheels,
    )
    check_target_abi(site)
    drop_install_paths(site)
    # Console scripts carry this machine's interpreter path in their shebang; FC runs `python -m gunicorn`.
    files = tree_files(site, "python", exclude_top=("bin",))
    zip_path = out / DEPS_ZIPS[function]
    write_zip(zip_path, files)
    return zip_path


def drop_install_paths(site: Path) -> None:
    """pip records where each wheel was installed from (direct_url.json, a temp path): not layer content,
    and it would make two builds of the same locks differ."""
    for marker in sorted(site.glob("*.dist-info/direct_url.json")):
        record = marker.parent / "RECORD"
        if record.exists():
            kept = [line for line in record.read_text().splitlines() if "/direct_url.json," not in line]
            record.write_text("\n".join(kept) + "\n")
        marker.unlink()


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
    parser.add_argument("--function", choices=sorted(LOCKS), help="build only this function's deps layer")
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
            for function in [args.function] if args.function else LOCKS:
                zips[DEPS_ARN_VARS[function]] = build_deps_layer(out, function)
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
