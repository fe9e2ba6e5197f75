#!/usr/bin/env python3
"""Serve the package files this machine's pip keeps on its own disk to an image build, on 127.0.0.1.

A host's pip configuration (``pip config list``: its files and PIP_* variables) may name local
sources: ``file://`` package indexes and find-links folders. On the development and CI machines
they hold torch and its CUDA wheels, gigabytes that an image build would otherwise download from
PyPI again. This server offers every file those sources hold as one package index; a build on the
host network sets ``PIP_EXTRA_INDEX_URL=http://127.0.0.1:PORT/simple/`` and takes the rest from
PyPI. Of two identical files pip installs the one from the source it lists last, which is the
extra index, provided both links carry the file's hash (the build's log says how much came from
here).
Hashed requirements are checked against the lock whatever their source, so a file served here is
installed only if it is the very file the lock names.

usage: wheel_cache.py list            print the files found
       wheel_cache.py serve PORT_FILE serve them until SIGTERM; the port goes to PORT_FILE once bound

Standard library only.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse
from urllib.request import url2pathname

SOURCE_KEYS = ("index-url", "extra-index-url", "find-links")
PACKAGE_SUFFIXES = (".whl", ".tar.gz", ".zip")
HREF = re.compile(r"""href=["']([^"']+)""")


def configured_locations(config_listing: str) -> list[str]:
    """Every location the ``pip config list`` output names as an index or find-links source."""
    locations = []
    for line in config_listing.splitlines():
        key, _, value = line.partition("=")
        if key.rpartition(".")[2] in SOURCE_KEYS:
            locations += shlex.split(value)[0].split() if value.strip() else []
    return locations


def local_folder(location: str) -> Path | None:
    """The folder a ``file://`` URL or an absolute path names, if it exists on this machine."""
    if location.startswith("file:"):
        location = url2pathname(urlparse(location).path)
    path = Path(location)
    return path if path.is_absolute() and path.is_dir() else None


@dataclass(frozen=True)
class PackageFile:
    path: Path
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def package_files(folder: Path) -> dict[str, PackageFile]:
    """File name -> file for a find-links folder, or for a PEP 503 index (``<project>/index.html`` pages
    whose links point at files on this disk). Each file carries its sha256: pip ranks a link whose hash
    the requirement allows above one without, so without it PyPI's copy would win."""
    found: dict[str, PackageFile] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.name.endswith(PACKAGE_SUFFIXES):
            found.setdefault(entry.name, PackageFile(entry, file_sha256(entry)))
        page = entry / "index.html"
        if entry.is_dir() and page.is_file():
            base = page.resolve().as_uri()
            for href in HREF.findall(page.read_text(errors="replace")):
                target = urlparse(urljoin(base, html.unescape(href)))
                path = Path(url2pathname(unquote(target.path)))
                if target.scheme != "file" or not path.name.endswith(PACKAGE_SUFFIXES) or not path.is_file():
                    continue
                listed = re.fullmatch(r"sha256=([0-9a-f]{64})", target.fragment)
                sha256 = listed.group(1) if listed else file_sha256(path)
                found.setdefault(path.name, PackageFile(path, sha256))
    return found


def host_package_files() -> dict[str, PackageFile]:
    """Every package file the local sources of this machine's pip configuration hold."""
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    found: dict[str, PackageFile] = {}
    for location in configured_locations(listing):
        folder = local_folder(location)
        if folder is not None:
            for name, file in package_files(folder).items():
                found.setdefault(name, file)
    return found


def project_name(filename: str) -> str:
    """The normalized (PEP 503) project a wheel or sdist file name belongs to."""
    if filename.endswith(".whl"):
        name = filename.split("-")[0]
    else:
        stem = filename.removesuffix(".tar.gz").removesuffix(".zip")
        name = stem.rpartition("-")[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def index_pages(files: dict[str, PackageFile]) -> dict[str, bytes]:
    """URL path -> page of a PEP 503 index of ``files``: ``/simple/`` and ``/simple/<project>/``."""
    projects: dict[str, list[str]] = {}
    for name in sorted(files):
        projects.setdefault(project_name(name), []).append(name)

    def page(links: list[tuple[str, str]]) -> bytes:
        rows = "".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>\n' for href, text in links)
        return f"<!DOCTYPE html><html><body>\n{rows}</body></html>\n".encode()

    pages = {"/simple/": page([(f"/simple/{project}/", project) for project in projects])}
    for project, names in projects.items():
        pages[f"/simple/{project}/"] = page([(f"/files/{name}#sha256={files[name].sha256}", name)
                                             for name in names])
    return pages


@dataclass
class Served:
    """What a server handed out, for its closing line."""

    files: int = 0
    bytes: int = 0


def handler_for(files: dict[str, PackageFile], served: Served) -> type[BaseHTTPRequestHandler]:
    pages = index_pages(files)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
            path = unquote(urlparse(self.path).path)
            if path in pages:
                body = pages[path]
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            name = path.removeprefix("/files/")
            if not path.startswith("/files/") or name not in files:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            with open(files[name].path, "rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                shutil.copyfileobj(stream, self.wfile, 1 << 20)
            served.files += 1
            served.bytes += size

        def log_message(self, *_: object) -> None:  # quiet: pip reports what it fetched
            pass

    return Handler


def serve(port_file: Path) -> None:
    files, served = host_package_files(), Served()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(files, served))

    def stop(*_: object) -> None:
        print(f"wheel_cache.py: served {served.files} files, {served.bytes / 1e6:.0f} MB", file=sys.stderr)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    with tempfile.NamedTemporaryFile("w", dir=port_file.parent, delete=False) as tmp:
        tmp.write(f"{server.server_address[1]}\n")
    os.replace(tmp.name, port_file)  # whole, or not there yet
    print(f"wheel_cache.py: serving {len(files)} local package files as the index "
          f"http://127.0.0.1:{server.server_address[1]}/simple/", file=sys.stderr)
    server.serve_forever()


def main(argv: list[str]) -> int:
    if argv[:1] == ["list"] and len(argv) == 1:
        for name, file in sorted(host_package_files().items()):
            print(f"{name}\t{file.path}\t{file.sha256}")
        return 0
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(Path(argv[1]))
        return 0
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
