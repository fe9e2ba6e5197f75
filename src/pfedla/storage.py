"""Local paths and s3:// URIs behind one small API; tensors travel as safetensors only.

S3 endpoint and credentials come from the environment (AWS_ENDPOINT_URL or
MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from configs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pfedla.errors import ArtifactError, PfedlaError, shown


class StorageError(PfedlaError):
    """The object store or file system refused or failed an operation."""


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an s3:// URI needs a bucket name")
    return bucket, key


# botocore waits up to 20 s before each retry: more retries would stall a step for over half an hour.
MAX_S3_RETRIES = 100


def _s3_retries(text: str | None) -> int:
    """The retries ``PFEDLA_S3_RETRIES`` asks for (unset or empty: 5), a whole number up to MAX_S3_RETRIES."""
    value = (text or "").strip()
    if not value:
        return 5
    # the length check first: int() refuses strings of over 4300 digits with a ValueError of its own
    if not (value.isdecimal() and len(value) <= len(str(MAX_S3_RETRIES)) and int(value) <= MAX_S3_RETRIES):
        raise StorageError(f"PFEDLA_S3_RETRIES must be a whole number from 0 to {MAX_S3_RETRIES}, "
                           f"got {shown(text)}")
    return int(value)


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint, retrying transient faults with backoff."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    # Transient faults are retried with exponential backoff; PFEDLA_S3_RETRIES tunes how long.
    attempts = _s3_retries(os.environ.get("PFEDLA_S3_RETRIES"))
    # Keyed on the environment: boto3's default session would keep the first credentials it saw,
    # so a corrected or rotated key would never take effect in a running process.
    env = os.environ
    return _s3_client_for(endpoint, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"),
                          env.get("AWS_SESSION_TOKEN"), attempts)


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: str | None, key_id: str | None, secret: str | None, token: str | None,
                   attempts: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5,
                    read_timeout=30)
    session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret,
                                    aws_session_token=token)
    return session.client("s3", endpoint_url=endpoint, config=config)


def _s3_call(action: str, uri: str, call: Any) -> Any:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except (ClientError, Boto3Error) as error:
        # Managed transfers wrap the store's ClientError in a Boto3Error: report the store's code.
        cause = error if isinstance(error, ClientError) else error.__context__
        if not isinstance(cause, ClientError):
            raise StorageError(f"cannot {action} {uri}: {error}") from None
        code = cause.response.get("Error", {}).get("Code", "?")
        hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" if code in (
            "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403") else ""
        raise StorageError(f"cannot {action} {uri}: {code}{hint}") from None
    except BotoCoreError as error:
        raise StorageError(f"cannot {action} {uri}: object store unreachable ({error})") from None


MULTIPART_BYTES = 64 * 2**20


def _transfer_config() -> Any:
    """boto3's managed transfers: multipart (and parallel) above 64 MiB, so objects past the 5 GB
    single-PUT limit (an 18M-parameter model stack at N=100 is 7 GB) still work."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)


def write_bytes(location: str | Path, data: bytes, root: str | Path | None = None) -> None:
    """Write atomically: a local file via an exclusive temporary file renamed into place
    (``write_local``, confined to ``root``), an S3 object by one (multipart) upload, which becomes
    visible only when complete."""
    if is_s3(location):
        bucket, key = split_s3(str(location))
        if len(data) <= MULTIPART_BYTES:
            _s3_call("write", str(location),
                     lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        else:
            _s3_call("write", str(location), lambda: s3_client().upload_fileobj(
                io.BytesIO(data), bucket, key, Config=_transfer_config()))
        return
    write_local(Path(location), lambda out: out.write(data), root)


def _parts_below(path: Path, root: Path, action: str) -> list[str]:
    """``path``'s names below ``root``, refusing one that is not plainly inside it (``..``)."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = ()
    if not parts or ".." in parts:
        raise StorageError(f"refusing to {action} {path}: it is not a file inside {root}")
    return list(parts)


def _open_folder(root: Path, parts: list[str], location: Path, create: bool, action: str) -> int | None:
    """An open descriptor of ``root/parts...``, each of ``parts`` a real folder (created when
    ``create``; otherwise a missing one gives None), never a symbolic link: what is opened below it
    stays inside ``root``. The caller closes it."""
    reached = root
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in parts:
            reached = reached / part
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=descriptor)
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=descriptor)
            finally:
                os.close(descriptor)
            descriptor = child
    except FileNotFoundError:
        if create:
            raise StorageError(f"cannot {action} {location}: {reached} vanished meanwhile") from None
        return None
    except OSError as error:
        if reached.is_symlink():
            raise StorageError(f"cannot {action} {location}: {reached} is a symbolic link, and pfedla never "
                               f"goes through one (it could lead outside {root}): remove it") from None
        raise StorageError(f"cannot {action} {location}: {error.strerror or error}") from None
    return descriptor


def write_local(path: Path, fill: Callable[[BinaryIO], object], root: str | Path | None = None) -> None:
    """Write a local file through ``fill(file)``, atomically and only inside ``root`` (default: the
    file's folder).

    The bytes go to a new temporary file beside ``path``, created exclusively (never an existing
    file, never through a link), which is then renamed over ``path``: a kill leaves the previous
    content under the final name, and a symbolic link at ``path`` is replaced, not followed. Every
    folder between ``root`` and the file must be a real folder (a link is refused), so nothing is
    written outside ``root``. A failure is a StorageError and the file keeps its previous content.
    """
    base = path.parent if root is None else Path(root)
    *folders, name = _parts_below(path, base, "write")
    folder = _open_folder(base, folders, path, create=True, action="write")
    try:
        for _ in range(100):
            temporary = f"{name}.{secrets.token_hex(6)}.partial"
            try:
                descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o666, dir_fd=folder)
                break
            except FileExistsError:
                continue
            except OSError as error:  # a full or read-only disk, a name too long
                raise StorageError(f"cannot write {path}: {error.strerror or error}") from None
        else:
            raise StorageError(f"cannot write {path}: no free temporary name beside it")
        try:
            with os.fdopen(descriptor, "wb") as out:
                fill(out)
            os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException as error:  # an error or Ctrl-C removes it; a kill leaves it, never a torn file
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
            if isinstance(error, OSError):
                raise StorageError(f"cannot write {path}: {error.strerror or error}") from None
            raise
    finally:
        os.close(folder)


def first_link(root: Path, relative: str) -> Path | None:
    """The first of ``root/relative``'s names below ``root`` that is a symbolic link, or None."""
    reached = root
    for part in Path(relative).parts:
        reached = reached / part
        if reached.is_symlink():
            return reached
        if not reached.exists():
            return None
    return None


def read_bytes(location: str | Path) -> bytes:
    if is_s3(location):
        bucket, key = split_s3(str(location))
        response = _s3_call("read", str(location), lambda: s3_client().get_object(Bucket=bucket, Key=key))
        return _s3_call("read", str(location), response["Body"].read)
    try:
        return Path(location).read_bytes()
    except OSError as error:
        raise StorageError(f"cannot read {location}: {error.strerror}") from None


def _s3_listing(uri: str, bucket: str, prefix: str, delimiter: str | None = None
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Objects under ``prefix`` and, with a ``delimiter``, the folders directly in it; all pages."""
    paginator = s3_client().get_paginator("list_objects_v2")
    scope = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    pages = _s3_call("list", uri, lambda: list(paginator.paginate(**scope)))
    objects = [item for page in pages for item in page.get("Contents", [])]
    folders = [item["Prefix"][len(prefix):].rstrip("/")
               for page in pages for item in page.get("CommonPrefixes", [])]
    return objects, folders


def _s3_objects(uri: str, bucket: str, prefix: str) -> list[dict[str, Any]]:
    return _s3_listing(uri, bucket, prefix)[0]


def list_names(folder: str | Path) -> list[str]:
    """Names of the objects/files directly inside ``folder`` (empty if it does not exist)."""
    if is_s3(folder):
        bucket, prefix = split_s3(str(folder).rstrip("/") + "/")
        return sorted(item["Key"][len(prefix):] for item in _s3_listing(str(folder), bucket, prefix, "/")[0])
    path = Path(folder)
    return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []


def list_folders(folder: str | Path) -> list[str]:
    """Names of the folders (S3: common prefixes) directly inside ``folder``."""
    if is_s3(folder):
        bucket, prefix = split_s3(str(folder).rstrip("/") + "/")
        return sorted(_s3_listing(str(folder), bucket, prefix, "/")[1])
    path = Path(folder)
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def delete(location: str | Path, root: str | Path | None = None) -> None:
    """Remove one object or file; missing is fine. A local file is removed only inside ``root``
    (default: its folder), never through a symbolic link to a folder on the way."""
    if is_s3(location):
        bucket, key = split_s3(str(location))
        _s3_call("delete", str(location), lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    path = Path(location)
    base = path.parent if root is None else Path(root)
    *folders, name = _parts_below(path, base, "delete")
    folder = _open_folder(base, folders, path, create=False, action="delete")
    if folder is None:  # its folder is gone: so is the file
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)


def copy(source: str | Path, target: str | Path) -> None:
    """Copy one object/file; on S3 the store copies it (no bytes pass through this process)."""
    if is_s3(source) and is_s3(target):
        (src_bucket, src_key), (bucket, key) = split_s3(str(source)), split_s3(str(target))
        _s3_call("copy", f"{source} to {target}", lambda: s3_client().copy(
            {"Bucket": src_bucket, "Key": src_key}, bucket, key, Config=_transfer_config()))
        return
    if is_s3(source) or is_s3(target):
        write_bytes(target, read_bytes(source))
        return
    try:
        with open(source, "rb") as original:
            write_local(Path(target), lambda out: shutil.copyfileobj(original, out))
    except OSError as error:
        raise StorageError(f"cannot copy {source} to {target}: {error.strerror}") from None


def delete_prefix(prefix: str | Path) -> int:
    """Remove everything under a folder or s3:// prefix; returns how many objects/files went."""
    if is_s3(prefix):
        bucket, key_prefix = split_s3(str(prefix).rstrip("/") + "/")
        keys = [item["Key"] for item in _s3_objects(str(prefix), bucket, key_prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True}
            _s3_call("delete", str(prefix),
                     lambda b=batch: s3_client().delete_objects(Bucket=bucket, Delete=b))
        return len(keys)
    path = Path(prefix)
    if path.is_symlink():
        raise StorageError(f"refusing to delete what {prefix} holds: it is a symbolic link, and pfedla never "
                           "deletes through one (it could lead anywhere): remove it")
    if not path.is_dir():
        return 0
    count = sum(1 for p in path.rglob("*") if p.is_file())
    shutil.rmtree(path)
    return count


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    """Named tensors as safetensors bytes; ``metadata`` (JSON-able) rides in the header."""
    header = {"pfedla": json.dumps(metadata or {}, sort_keys=True)}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save_safetensors_bytes(contiguous, metadata=header)


def tensors_from_bytes(data: bytes, where: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Parse ``tensor_bytes`` output; damage gives an ArtifactError naming ``where``."""
    try:
        tensors = load_safetensors_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = json.loads(header.get("__metadata__", {}).get("pfedla", "{}"))
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as error:
        raise ArtifactError(f"{where} is not a valid safetensors file: {error}") from None
    except RecursionError:  # metadata JSON nested thousands of levels deep
        raise ArtifactError(f"{where} is not a valid safetensors file: its metadata is nested too deeply") \
            from None
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{where}: metadata is not a JSON object")
    return tensors, metadata


def save_tensors(location: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None, root: str | Path | None = None) -> None:
    """Store named tensors as safetensors (locally only inside ``root``, see ``write_local``);
    ``metadata`` (JSON-able) rides in the header."""
    write_bytes(location, tensor_bytes(tensors, metadata), root)


def load_tensors(location: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read safetensors written by ``save_tensors``; damage gives an ArtifactError naming the file."""
    return tensors_from_bytes(read_bytes(location), location)


def write_json(location: str | Path, payload: Any, root: str | Path | None = None) -> None:
    """``payload`` as JSON with sorted keys, written like ``write_bytes``."""
    write_bytes(location, json.dumps(payload, indent=2, sort_keys=True).encode(), root)


def json_from_bytes(data: bytes, where: str | Path) -> Any:
    """Parse JSON bytes; invalid JSON gives an ArtifactError naming ``where``."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{where} is not valid JSON: {error}") from None
    except RecursionError:  # "[" * 200000: Python's parser recurses once per level
        raise ArtifactError(f"{where} is not valid JSON: nested too deeply") from None


def read_json(location: str | Path) -> Any:
    return json_from_bytes(read_bytes(location), location)


def cache_path(destination: Path, key_suffix: str) -> Path:
    """Where the object ``<prefix>/<key_suffix>`` goes under ``destination``, refusing keys that
    would land outside it: S3 keys are free-form, and AWS accepts ``a/../../x`` or ``/etc/x``."""
    parts = key_suffix.split("/")
    if "\\" in key_suffix or any(part in ("", ".", "..") for part in parts):  # also catches a leading /
        raise StorageError(f"refusing object key suffix {key_suffix[:200]!r}: it is not a plain relative "
                           f"path and could write outside {destination}")
    return destination.joinpath(*parts)


def download_prefix(prefix: str, destination: Path) -> Path:
    """Copy every object under an s3:// prefix into ``destination`` (skipping unchanged sizes).

    Every key is checked before anything is written: a key that would land outside
    ``destination`` stops the download with an error naming it.
    """
    bucket, key_prefix = split_s3(prefix.rstrip("/") + "/")
    objects = _s3_objects(prefix, bucket, key_prefix)
    if not objects:
        raise StorageError(f"no objects under {prefix}")
    targets = [(item, cache_path(destination, item["Key"][len(key_prefix) :])) for item in objects]
    for item, target in targets:
        if target.is_file() and target.stat().st_size == item["Size"]:
            continue
        write_bytes(target, read_bytes(f"s3://{bucket}/{item['Key']}"), root=destination)
    return destination
