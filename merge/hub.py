"""The Hugging Face Hub: fetch only the files a merge needs, and push a merged folder.

Everything goes through ``huggingface_hub`` and so honours its standard settings: the cache under
``HF_HOME``, the token (``HF_TOKEN`` or the cached ``hf auth login``), ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``.
Tokens are passed to the client only; they are never printed, logged or written into any file.
"""

from __future__ import annotations

import glob
import re
import shlex
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from .errors import InputError, MergeError
from .io.output import SIDE_FILES

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Files fetched next to the weights: config, generation config, every tokenizer file, the card (for --base auto).
EXTRA_FILES = frozenset(SIDE_FILES) | {"config.json", "README.md", "adapter_config.json"}
# Weights of an earlier push that this push did not write are deleted, so the repo never mixes two merges.
STALE_WEIGHTS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
DEFAULT_COMMIT_MESSAGE = "Upload merged model (mergeback)"


class PushError(MergeError):
    """Uploading a finished output folder failed; the folder is intact and ``merge push`` can retry."""


def is_repo_id(name: str) -> bool:
    """``namespace/name`` as the Hub spells repo ids (no revision)."""
    return bool(REPO_ID.match(name)) and ".." not in name and not name.endswith((".git", "."))


def check_repo_id(repo_id: str, what: str) -> None:
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise InputError(f"{what} {repo_id!r}: not a Hub repo id; give NAMESPACE/NAME, e.g. me/med-recovered")


def split_revision(ref: str, label: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); no ``@`` -> revision None."""
    name, sep, revision = ref.partition("@")
    if sep and not revision:
        raise InputError(f"{label or ref}: empty revision after '@'; give a branch, tag or commit, e.g. {name}@main")
    return name, (revision or None)


# ---- pulling -------------------------------------------------------------------------------------------


def choose_files(names: list[str], label: str) -> list[str]:
    """The files of a repo a merge reads: weights of one format (safetensors preferred; an adapter's own
    weights for adapter repos), config, generation config, every tokenizer file and the model card."""
    top = {n for n in names if "/" not in n}
    if "adapter_config.json" in top:
        formats = [("adapter_model", ".safetensors"), ("adapter_model", ".bin")]
    else:
        formats = [("model", ".safetensors"), ("pytorch_model", ".bin")]
    weights: list[str] = []
    for stem, ext in formats:
        weights = sorted(n for n in top if n.startswith(stem) and (n.endswith(ext) or n == f"{stem}{ext}.index.json"))
        if any(n.endswith(ext) for n in weights):
            break
        weights = []
    if not weights:
        raise InputError(f"{label}: the repo has no model weights at its top level (model*.safetensors or "
                         "pytorch_model*.bin); give a repo or folder holding a transformers checkpoint")
    side = sorted(n for n in top if n in EXTRA_FILES or n.startswith(("tokenizer", "chat_template"))
                  or n.endswith(".tiktoken"))
    return weights + side


@contextmanager
def _progress_bars(show: bool):
    """huggingface_hub's own progress bars, on or off for the duration (restored afterwards)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    change = not show and not are_progress_bars_disabled()
    if change:
        disable_progress_bars()
    try:
        yield
    finally:
        if change:
            enable_progress_bars()


def _network_errors() -> tuple[type, ...]:
    """Exceptions meaning "the Hub cannot be reached" for whichever HTTP stack huggingface_hub uses."""
    import importlib

    errors: list[type] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def fetch(repo_id: str, revision: str | None, label: str, *, token=None, progress: bool = False,
          weights: bool = True) -> tuple[Path, str, tuple[str, ...]]:
    """Download what a merge needs of ``repo_id@revision`` into the standard cache; return (folder, commit,
    pending).

    Lists the repo first, then ``snapshot_download`` with exactly those files. ``weights=False`` leaves the
    safetensors weight files of a full checkpoint on the Hub (``pending``, those not cached yet): their headers
    are read with :func:`read_headers` and :func:`fetch_files` downloads them once the inputs are checked.
    Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, a cached snapshot of that revision is used.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        wanted = choose_files([s.rfilename for s in info.siblings or []], label)
        later = [] if weights else [n for n in wanted if n.endswith(".safetensors") and n.startswith("model")]
        with _progress_bars(progress):
            folder = Path(snapshot_download(repo_id, revision=revision, token=token,
                                            allow_patterns=[glob.escape(n) for n in wanted if n not in later]))
    except HfHubHTTPError as e:
        raise InputError(f"{label}: {_download_problem(e, repo_id, revision)}") from None
    except _network_errors() + (LocalEntryNotFoundError,) as e:
        return (*_from_cache(repo_id, revision, label, e), ())
    folder.mkdir(parents=True, exist_ok=True)  # a repo of weights alone: the snapshot folder holds nothing yet
    return folder, folder.name, tuple(n for n in later if not (folder / n).is_file())  # folders are named by commit


def fetch_files(repo_id: str, commit: str, files, label: str, *, token=None, progress: bool = False) -> Path:
    """Download ``files`` of ``repo_id`` at ``commit`` into its cached snapshot folder (the pending weights)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        with _progress_bars(progress):
            return Path(snapshot_download(repo_id, revision=commit, token=token,
                                          allow_patterns=[glob.escape(n) for n in files]))
    except HfHubHTTPError as e:
        raise InputError(f"{label}: downloading the weights failed: {_download_problem(e, repo_id, commit)}") from None
    except _network_errors() as e:
        raise InputError(f"{label}: downloading the weights failed: {_unreachable(e)}; rerun to resume "
                         "the download") from None


# The first request for a header: most safetensors headers fit (huggingface_hub reads the same amount).
HEADER_PROBE_BYTES = 100_000


def read_headers(repo_id: str, commit: str, files, label: str, *, token=None) -> dict[str, tuple[dict, dict]]:
    """The validated headers (tensors, metadata) of the safetensors ``files`` of ``repo_id@commit``, read with
    HTTP range requests: the first 100 kB of each file, and the rest of a header that is larger."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub.errors import HfHubHTTPError

    files = list(files)
    try:
        with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
            headers = list(pool.map(lambda name: _remote_header(repo_id, commit, name, token), files))
    except HfHubHTTPError as e:
        raise InputError(f"{label}: reading the weight headers failed: {_download_problem(e, repo_id, commit)}"
                         ) from None
    except _network_errors() as e:
        raise InputError(f"{label}: reading the weight headers failed: {_unreachable(e)}") from None
    return dict(zip(files, headers))


@lru_cache(maxsize=256)  # a commit's files never change; a LoRA adapter and the run both open its base
def _remote_header(repo_id: str, commit: str, filename: str, token) -> tuple[dict, dict]:
    from huggingface_hub import hf_hub_url

    from .io.safetensors_file import header_length, parse_header

    where = f"{repo_id}@{commit}/{filename}"
    url = hf_hub_url(repo_id, filename, revision=commit)
    data, size = _read_range(url, 0, HEADER_PROBE_BYTES, token)
    header_len = header_length(data, size, where)
    if 8 + header_len > len(data):
        data += _read_range(url, len(data), 8 + header_len, token)[0]
    return parse_header(data[8:8 + header_len], size, where)


def _read_range(url: str, start: int, stop: int, token) -> tuple[bytes, int]:
    """Bytes [start, stop) of the file at ``url`` (fewer at its end) and the file's size. A server that ignores
    the range is read only that far, never to the end."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    headers = {**build_hf_headers(token=token), "Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
    with http_stream_backoff("GET", url, headers=headers) as r:
        hf_raise_for_status(r)
        total = r.headers.get("Content-Range", "").rpartition("/")[2]
        skip = 0 if r.status_code == 206 else start  # 200: the whole file from byte 0
        size = int(total) if total.isdigit() else int(r.headers.get("Content-Length") or 0)
        chunks, have = [], 0
        for chunk in r.iter_bytes():
            chunks.append(chunk)
            have += len(chunk)
            if have >= skip + stop - start:
                break
    return b"".join(chunks)[skip:skip + stop - start], size


def _from_cache(repo_id: str, revision: str | None, label: str, error: Exception) -> tuple[Path, str]:
    """The cached snapshot of ``revision`` when the Hub cannot be asked."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(error)
    try:
        # allow_patterns=[]: only locate the snapshot; which files it must hold is checked just below.
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[], local_files_only=True))
    except LocalEntryNotFoundError:
        at = f"@{revision}" if revision else ""
        raise InputError(f"{label}: {repo_id}{at} is not in the local cache and {why}: download it once with "
                         "network access (HF_HUB_OFFLINE unset), or give a local folder") from None
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    if not any(n.endswith((".safetensors", ".bin")) for n in files):
        at = f"@{revision}" if revision else ""
        raise InputError(f"{label}: the cached copy of {repo_id}{at} in {folder} holds no weights (a dry run or "
                         f"`merge plan` reads only their headers) and {why}: run the merge once with network "
                         "access, or give a local folder")
    choose_files(files, f"{label} (cached copy in {folder})")
    return folder, folder.name


def _unreachable(error: Exception) -> str:
    from huggingface_hub import constants

    return f"the Hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__})"


def _download_problem(e, repo_id: str, revision: str | None) -> str:
    """One sentence with the fix, for an HTTP error of the Hub while looking up a model."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    page = f"{constants.ENDPOINT}/{repo_id}"
    if isinstance(e, GatedRepoError):
        return (f"{repo_id} is gated: accept its terms on {page} and log in (`hf auth login`, or set HF_TOKEN) "
                "with the account that has access")
    if isinstance(e, RepositoryNotFoundError):
        return (f"no local folder, alias or Hub repo {repo_id!r} that you can see: check the name "
                "(`merge aliases` lists aliases); a private repo needs `hf auth login` (or HF_TOKEN) with access")
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}: give an existing branch, tag or commit of {page}"
    return _http_problem(e, "read")


def _http_problem(e, action: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return ("the Hub rejected your token (HTTP 401: invalid or expired): log in again with `hf auth login` or "
                f"set HF_TOKEN to a valid token that may {action} the repo")
    if status == 403:
        return (f"your token may not {action} this repo (HTTP 403): use a token with {action} access to its "
                "namespace")
    return f"the Hub answered HTTP {status}: try again later" + (
        "" if action == "write" else ", or use the cache with HF_HUB_OFFLINE=1")


# ---- pushing -------------------------------------------------------------------------------------------


def push(out: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, progress: bool = False) -> str:
    """Upload the model folder ``out`` to the Hub model repo ``repo_id``; return its URL.

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` if it is missing,
    and uploads the folder in one commit; weight files of an earlier push that this folder lacks are
    deleted. ``token`` defaults to the standard places (HF_TOKEN, the cached login). On failure the folder
    is untouched and the error says how to retry.
    """
    check_repo_id(repo_id, "repo")
    folder = Path(out).expanduser().resolve()
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"{folder}: no model folder to push there; give the output folder of a merge")
    retry = " ".join(["merge push", shlex.quote(str(folder)), repo_id] + (["--private"] if private else [])
                     + (["--revision", shlex.quote(revision)] if revision else []))
    try:
        url = _upload(folder, repo_id, private, revision, commit_message, token, progress)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure of the upload gets the same retry advice
        reason = _push_problem(e)
        if reason is None:
            raise
        raise PushError(f"pushing {folder} to {repo_id} failed: {reason}; the merged model in {folder} is "
                        f"intact - retry with: {retry}") from None
    return url


def _upload(folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
            token, progress: bool) -> str:
    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise _NoToken()
    api = HfApi(token=token)
    with _progress_bars(progress):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                          commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                          ignore_patterns=[".*"], delete_patterns=STALE_WEIGHTS)
    url = str(getattr(repo_url, "url", repo_url)).rstrip("/")
    return f"{url}/tree/{revision}" if revision else url


class _NoToken(Exception):
    pass


def _push_problem(e: Exception) -> str | None:
    """One sentence for a failed push, or None for an error that is not about the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    if isinstance(e, _NoToken):
        return "no Hub token found: log in with `hf auth login` or set HF_TOKEN to a token with write access"
    if constants.HF_HUB_OFFLINE and isinstance(e, ConnectionError):
        return "HF_HUB_OFFLINE is set: unset it to push"
    if isinstance(e, RevisionNotFoundError):
        return "the branch could not be found or created: check --revision"
    if isinstance(e, HfHubHTTPError):
        return _http_problem(e, "write")
    if isinstance(e, _network_errors()):
        return f"the Hub at {constants.ENDPOINT} cannot be reached ({type(e).__name__}): check your connection"
    return None
