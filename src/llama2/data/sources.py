"""Text sources for the pretraining corpus: standard-library docstrings, pydoc topics, the Python documentation
sources (Debian's python3.11-doc), and user files (.txt, .jsonl). Each source yields plain document strings in a
fixed order, so a corpus built twice is the same."""

from __future__ import annotations

import ast
import copy
import os
import sysconfig
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from ..errors import Llama2Error
from .jsonl import field_problem, read_jsonl
from .world import ensure_world

SOURCES = ("stdlib", "pydoc", "python-docs", "files", "stdlib-source", "world")
DEFAULT_SOURCES = ("stdlib", "pydoc")
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
MIN_DOCSTRING_WORDS = 8  # shorter docstrings ("Return self.") are too trivial to be documents
PYTHON_DOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
FILE_SUFFIXES = (".txt", ".jsonl")

_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def expand_sources(sources: list[str]) -> list[str]:
    """Validate source names; "default" stands for stdlib + pydoc. Duplicates are dropped, order kept."""
    out: list[str] = []
    for s in sources:
        names = DEFAULT_SOURCES if s == "default" else (s,)
        for n in names:
            if n not in SOURCES:
                raise Llama2Error(f"unknown corpus source {s!r}; choose from default, {', '.join(SOURCES)}")
            if n not in out:
                out.append(n)
    if not out:
        raise Llama2Error(f"no corpus source given; choose from default, {', '.join(SOURCES)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Standard library docstrings


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in sorted order, without tests, idlelib and site-packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _collect_docstrings(node: ast.AST, out: list[str]) -> None:
    """Docstrings of node and the definitions nested in its statements (also under if/try/with/match)."""
    if isinstance(node, _DEFS):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                _collect_docstrings(child, out)
    for case in getattr(node, "cases", None) or ():
        for child in case.body:
            _collect_docstrings(child, out)


def file_docstrings(path: Path) -> list[str]:
    """The docstrings of one Python file (module, classes, functions) in source order; [] if it does not parse."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    out: list[str] = []
    _collect_docstrings(tree, out)
    return [d.strip() for d in out if len(d.split()) >= MIN_DOCSTRING_WORDS]


def stdlib_documents(workers: int | None = None, root: Path | None = None) -> Iterator[str]:
    """One document per non-trivial docstring of the standard library, parsed in parallel processes."""
    files = stdlib_files(root)
    workers = max(1, min(workers or os.cpu_count() or 1, 8))
    if workers == 1:
        for f in files:
            yield from file_docstrings(f)
        return
    ctx = get_context("fork") if "fork" in get_all_start_methods() else get_context()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for docs in pool.map(file_docstrings, files, chunksize=8):
            yield from docs


# ---------------------------------------------------------------------------------------------------------------
# pydoc topics and the Python documentation


def pydoc_documents() -> Iterator[str]:
    """One document per pydoc_data topic, sorted by topic name."""
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def python_docs_documents(root: Path | None = None) -> Iterator[str]:
    """One document per reStructuredText source of the Python documentation (python3.11-doc)."""
    root = Path(root or PYTHON_DOCS_ROOT)
    if not root.is_dir():
        raise Llama2Error(f"the python-docs source needs the Python documentation sources in {root}, which are not "
                          f"installed; run `apt-get install python3.11-doc` (Debian/Ubuntu) or use another --source")
    files = sorted(root.rglob("*.rst.txt"))
    if not files:
        raise Llama2Error(f"no *.rst.txt files under {root}; reinstall with `apt-get install --reinstall "
                          f"python3.11-doc`")
    return _text_files(files)


def _text_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        text = _read_text(path).strip()
        if text:
            yield text


# ---------------------------------------------------------------------------------------------------------------
# User files


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise Llama2Error(f"{path}: not valid UTF-8 (byte {e.start}); convert the file to UTF-8") from None
    except OSError as e:
        raise Llama2Error(f"cannot read {path}: {e.strerror}") from None


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files named directly, plus the .txt/.jsonl files under named directories (sorted); each checked."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
            if not found:
                raise Llama2Error(f"directory {p} holds no .txt or .jsonl files")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in FILE_SUFFIXES:
                raise Llama2Error(f"{p}: unsupported file type {p.suffix or '(none)'!r}; give .txt files (one "
                                  f"document per file) or .jsonl files (a \"text\" field per line)")
            out.append(p)
        else:
            raise Llama2Error(f"input not found: {p}")
    return out


def jsonl_texts(path: Path, progress: Callable[[int], Any] | None = None) -> Iterator[str]:
    """The "text" field of each line of a .jsonl file, streamed; blank lines are skipped. A malformed line is a
    Llama2Error naming file:line. progress: called with the bytes of each line read."""
    reader = read_jsonl(path, hint='each line of a .jsonl file must be a JSON object with a "text" string field',
                        progress=progress)
    for lineno, obj in reader:
        if problem := field_problem(obj, "text", str, "a string"):
            reader.bad(lineno, problem)
            continue
        yield obj["text"]


def file_documents(paths: list[Path]) -> Iterator[str]:
    """Documents of user files: a whole .txt file is one document; each .jsonl line's "text" is one document.
    Paths are checked at once; the files are read as the iterator is consumed."""
    return _file_documents(expand_paths(paths))


def _file_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix.lower() == ".jsonl":
            yield from jsonl_texts(path)
        else:
            yield _read_text(path)


def source_documents(source: str, paths: list[Path], workers: int | None = None) -> Iterator[str]:
    """Documents of one named source (after expand_sources)."""
    if source == "stdlib":
        return stdlib_documents(workers)
    if source == "pydoc":
        return pydoc_documents()
    if source == "python-docs":
        return python_docs_documents()
    if source == "stdlib-source":
        return stdlib_source_documents()
    if source == "world":  # the built-in world's documents (llama2.data.world)
        return jsonl_texts(ensure_world(quiet=True) / "corpus.jsonl")
    if source == "files":
        if not paths:
            raise Llama2Error("--source files needs one or more .txt/.jsonl files or directories")
        return file_documents(paths)
    raise Llama2Error(f"unknown corpus source {source!r}; choose from default, {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------------------------------------------
# Standard library source code

# generated or data-only modules: pydoc's topic table (the pydoc source already holds it), Unicode/charmap tables
STDLIB_SOURCE_SKIP_DIRS = frozenset({"pydoc_data", "encodings"})
STDLIB_SOURCE_MAX_BYTES = 200_000  # larger files are mostly tables (e.g. _pydecimal's) or would dominate


def stdlib_source_documents(root: Path | None = None) -> Iterator[str]:
    """One document per .py module of the standard library (its whole source text, UTF-8), in sorted order;
    skips tests, idlelib, site-packages, the pydoc topic table, the codec tables and files over 200 kB."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(root):
        if STDLIB_SOURCE_SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            if path.stat().st_size > STDLIB_SOURCE_MAX_BYTES:
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            yield text.strip()


# ---------------------------------------------------------------------------------------------------------------
# Function signatures with their docstrings (the built-in instruction data, data/dialogues.py)


def module_name(path: Path, root: Path | None = None) -> str:
    """The dotted module name of a standard-library file: json/decoder.py -> json.decoder, json/__init__.py -> json."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    parts = list(Path(path).relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or Path(path).stem


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    """The parameter list as written in the source, without `self`/`cls` for methods (defaults align with the
    last positional parameters, so dropping the first one keeps them right)."""
    args = copy.copy(node.args)
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    if method and not static:
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        elif args.args:
            args.args = args.args[1:]
    try:
        return ast.unparse(args)
    except (ValueError, TypeError):
        return "..."


def file_signatures(path: Path, root: Path | None = None) -> list[tuple[str, str, str]]:
    """(qualified name, parameter list, docstring) of every public function and method of one standard-library
    file that has a docstring of at least MIN_DOCSTRING_WORDS words, in source order; [] if it does not parse.
    E.g. ("json.dumps", "obj, *, skipkeys=False, ...", "Serialize ``obj`` to a JSON formatted ``str``...")."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    module = module_name(path, root)
    out: list[tuple[str, str, str]] = []

    def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                    out.append((f"{prefix}.{node.name}", _signature(node, in_class), doc.strip()))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}.{node.name}", True)

    visit(tree.body, module, False)
    return out
