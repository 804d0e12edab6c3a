"""The stack image a Docker backend's containers run, built here from this machine's files.

No registry is reachable, so the image is a minimal root file system holding this Python
interpreter (standard library without tests and GUI modules), the packages the stacks need
(apsv, pydantic and its parts), and the shared libraries those binaries load. It is imported
into the engine with ``docker import`` under a tag derived from its contents, so it is built
once per code version.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from importlib import metadata, util
from pathlib import Path
from typing import Any

PY_ROOT = "/opt/apsv/python"  # where the interpreter's prefix goes inside the image
SITE = "/opt/apsv/site"  # the packages
SOCKET_DIR = "/run/apsv"  # in the container: the bind-mounted socket directory (empty in the image)
STDLIB_SKIP = {
    "site-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "config-3.11-x86_64-linux-gnu",
}
PACKAGES = ["apsv", "pydantic", "pydantic_core", "typing_extensions", "annotated_types", "typing_inspection"]
IMAGE_REPO = "apsv-stack"


def docker_client() -> Any:
    import docker

    return docker.DockerClient(
        base_url=os.environ.get("APSV_DOCKER_HOST") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    )


def _package_paths() -> list[tuple[Path, str]]:
    """(source, path inside the image) for each package and the mypyc runtime next to apsv."""
    out: list[tuple[Path, str]] = []
    for name in PACKAGES:
        spec = util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot build the stack image: package {name} is not installed")
        origin = Path(spec.origin)
        src = origin.parent if origin.name == "__init__.py" else origin
        out.append((src, f"{SITE}/{src.name}"))
    apsv_root = Path(util.find_spec("apsv").origin).parent.parent  # type: ignore[union-attr, arg-type]
    for so in apsv_root.glob("*__mypyc*.so"):
        out.append((so, f"{SITE}/{so.name}"))
    dist = metadata.distribution("apsv")
    dist_path = getattr(dist, "_path", None)
    if dist_path is not None:  # its entry points name the stacks
        out.append((Path(dist_path), f"{SITE}/{Path(dist_path).name}"))
    return out


def _interpreter_files() -> list[tuple[Path, str]]:
    prefix = Path(sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    out = [(prefix / "bin" / ver, f"{PY_ROOT}/bin/python3")]
    stdlib = prefix / "lib" / ver
    for child in sorted(stdlib.iterdir()):
        if child.name not in STDLIB_SKIP:
            out.append((child, f"{PY_ROOT}/lib/{ver}/{child.name}"))
    return out  # libpython (a shared build) comes in with the shared libraries, at its own path


def _shared_libraries(binaries: Iterable[Path]) -> set[Path]:
    libs: set[Path] = set()
    for b in binaries:
        try:
            res = subprocess.run(["ldd", str(b)], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in res.stdout.splitlines():
            parts = line.split()
            path = (
                parts[2]
                if "=>" in parts and len(parts) > 2
                else parts[0]
                if parts and parts[0].startswith("/")
                else None
            )
            if path and path.startswith("/"):
                libs.add(Path(path))
    return libs


def _walk(entries: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    files = []
    for src, dst in entries:
        if src.is_dir():
            for p in sorted(src.rglob("*")):
                if p.is_file() and "tests" not in p.relative_to(src).parts[:1] and not p.name.startswith("_tkinter"):
                    files.append((p, f"{dst}/{p.relative_to(src)}"))
        elif src.is_file():
            files.append((src, dst))
    return files


def image_contents() -> list[tuple[Path, str]]:
    files = _walk(_interpreter_files() + _package_paths())
    binaries = [src for src, _ in files if src.suffix == ".so" or ".so." in src.name or src.name.startswith("python")]
    for lib in sorted(_shared_libraries(binaries)):
        files.append((lib.resolve(), str(lib)))
    return files


def image_tag(files: list[tuple[Path, str]]) -> str:
    h = hashlib.sha256()
    for src, dst in sorted(files, key=lambda x: x[1]):
        st = src.stat()
        h.update(f"{dst}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return f"{IMAGE_REPO}:{h.hexdigest()[:16]}"


def _tar(files: list[tuple[Path, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"/etc", "/tmp", SOCKET_DIR, "/lib64"}
        for d in sorted(dirs):
            info = tarfile.TarInfo(d.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "/tmp" else 0o755
            tar.addfile(info)
        for name, text in (
            ("etc/passwd", "root:x:0:0::/:/sbin/nologin\nnobody:x:65534:65534::/nonexistent:/sbin/nologin\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        seen: set[str] = set()
        for src, dst in files:
            if dst in seen:
                continue
            seen.add(dst)
            info = tar.gettarinfo(str(src), arcname=dst.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = (info.mode & 0o755) | 0o444  # world-readable; nothing writable
            with open(src, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def ensure_image(client: Any | None = None, tag: str | None = None) -> str:
    """The stack image for this code, built (from this machine's files) if the engine lacks it.

    Working out the tag walks the interpreter's files (half a second), so a caller that knows
    it (the VPSM computes it once) passes it, and this process remembers what it found.
    """
    client = client or docker_client()
    tag = tag or _known_tag.get("tag")
    if tag is not None:
        try:
            client.images.get(tag)
            _known_tag["tag"] = tag
            return tag
        except Exception:  # docker.errors.ImageNotFound: build it below
            pass
    files = image_contents()
    tag = image_tag(files)
    try:
        client.images.get(tag)
    except Exception:
        repo, version = tag.split(":")
        client.api.import_image_from_data(_tar(files), repository=repo, tag=version)
        _prune_old_images(client, keep=tag)
    _known_tag["tag"] = tag
    return tag


_known_tag: dict[str, str] = {}


def _prune_old_images(client: Any, keep: str) -> None:
    """Earlier builds of the stack image (other code versions) that no container uses."""
    for img in client.images.list(name=IMAGE_REPO):
        if keep in img.tags:
            continue
        with contextlib.suppress(Exception):  # still used by a container, or already gone
            client.images.remove(img.id)
