"""Every reference to a file of this repository resolves to a file (or folder) that exists.

Checked in every text file of the repository (tracked, or new and not ignored): Markdown, Python sources and
docstrings (package, tests, benchmarks, notebook sources), notebooks, YAML, TOML / cfg:

* relative Markdown links ``[text](path)`` in ``.md`` files, from the file's folder (web links and in-page anchors
  are skipped; a ``#fragment`` after a path is dropped);
* paths that start with a top-level folder of the repository (``docs/method.md``, ``configs/quickstart.yaml``,
  ``configs/_base/``, ``benchmarks/RESULTS.md``, ...), from the repository root. Globs (``configs/mae/vit_*.yaml``,
  ``{400,800}``) and placeholders (``configs/<family>/``, ``{name}``) must match at least one file;
* bare Markdown names (``README.md``, ``CHANGELOG.md``), from the mentioning file's folder or the repository root;
* in YAML files under ``configs/``: every ``*.yaml`` path (``config:`` includes, header ``twin:`` fields, comments),
  from the file's folder or from ``configs/``.

The output of ``masksub recipes`` (table and ``--json``) is checked the same way (bare names from the repository
root), and every recipe path field in it (``path``, ``twin``, ``pretrained_from``, ``result_after``) under configs/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from itertools import product
from pathlib import Path

import pytest

from masksub_lightning.commands.recipes import main as recipes_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Never scanned: version control, outputs of runs and builds, caches.
EXCLUDED_DIRS = {".git", "runs", "build", "dist", "__pycache__", ".venv", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".ipynb", ".toml", ".cfg", ".txt", ""}
FILE_EXTENSIONS = r"(?:md|ya?ml|py|ipynb)"
# A path segment: word characters, dots, dashes, glob stars, <placeholders> and {a,b} alternatives.
_SEGMENT = r"(?:[\w.*<>-]|\{[\w.,-]*\})+"
# A reference must start a token: not in the middle of a longer path, a URL or a word.
_START = r"(?<![\w./<>*{}-])"
_MD_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_BARE_MD = re.compile(_START + r"([\w-]+\.md)\b")
_YAML_PATH = re.compile(_START + r"((?:\.\.?/)*(?:" + _SEGMENT + r"/)*" + _SEGMENT + r"\.ya?ml)\b")


def repository_files(root: Path = ROOT) -> list[str]:
    """Paths (relative, POSIX) of the repository's files: git's tracked and new unignored files, else a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = {n for n in out.split("\0") if n}
    except (OSError, subprocess.CalledProcessError):
        names = set()
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.endswith(".egg-info")]
            names.update((Path(folder) / f).relative_to(root).as_posix() for f in files)
    # Files under a folder that a top-level link points to (./configs -> masksub_lightning/configs) are listed by
    # the link's path, the one users type and the docs use.
    for link in (p for p in root.iterdir() if p.is_symlink() and p.is_dir()):
        target = link.resolve().relative_to(root.resolve()).as_posix() + "/"
        names = {link.name + "/" + n[len(target) :] if n.startswith(target) else n for n in names}
    return sorted(
        n for n in names if not EXCLUDED_DIRS.intersection(Path(n).parts[:-1]) and (root / n).is_file()
    )


def top_level_folders(files: list[str]) -> list[str]:
    """The repository's top-level folders that hold files (hidden ones excluded)."""
    return sorted({n.split("/", 1)[0] for n in files if "/" in n and not n.startswith(".")})


def _rooted_path_pattern(tops: list[str]) -> re.Pattern[str]:
    names = "|".join(re.escape(t) for t in tops)
    # A file with a known extension, or a folder (trailing slash).
    return re.compile(
        _START
        + rf"((?:{names})/(?:(?:{_SEGMENT}/)*{_SEGMENT}\.{FILE_EXTENSIONS}\b|(?:{_SEGMENT}/)*(?![\w.*<>{{-])))"
    )


def _expand(pattern: str) -> list[str]:
    """Glob patterns for a reference: {a,b} alternatives expanded, {name} and <name> placeholders made ``*``."""
    pattern = re.sub(r"<[^<>/]*>", "*", pattern)
    pattern = re.sub(r"\{[^{},/]*\}", "*", pattern)  # an f-string field, not alternatives
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in product(*choices)]


def resolves(reference: str, bases: list[Path], root: Path = ROOT) -> bool:
    """Whether ``reference`` names an existing file or folder inside ``root``, relative to one of ``bases``."""
    root = root.resolve()
    for base in bases:
        for pattern in _expand(reference.rstrip("/") or "."):
            if any(c in pattern for c in "*?["):
                # Path.glob takes relative patterns only: climb for leading ../ first.
                folder, rest = base, pattern
                while rest.startswith("../"):
                    folder, rest = folder.parent, rest[3:]
                hits = [h for h in folder.glob(rest) if h.resolve().is_relative_to(root)]
            else:
                target = (base / pattern).resolve()
                hits = [target] if target.exists() and target.is_relative_to(root) else []
            if hits:
                return True
    return False


def unresolved_references(
    text: str, where: str | None, root: Path = ROOT, tops: list[str] | None = None
) -> list[str]:
    """References in ``text`` that name no file of the repository.

    Args:
        text: the content to scan.
        where: path of the file that holds ``text``, relative to ``root``; None for command output (bare names
            are then taken from the repository root, and Markdown links are not looked for).
        root: the repository root.
        tops: the repository's top-level folders (default: those of :func:`repository_files`).

    Returns:
        One entry per failing reference, ``"<kind>: <reference>"``, in order of appearance.
    """
    tops = top_level_folders(repository_files(root)) if tops is None else tops
    folder = (root / where).parent if where else root
    bad = []
    if where and where.endswith(".md"):
        for target in _MD_LINK.findall(_FENCE.sub("", text)):
            if re.match(r"[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):
                continue  # web / mail link, or an anchor in the same page
            path = target.split("#", 1)[0]
            if not resolves(path, [folder], root):
                bad.append(f"markdown link: {target}")
    for ref in _rooted_path_pattern(tops).findall(text) if tops else []:
        if not resolves(ref, [root], root):
            bad.append(f"path: {ref}")
    for ref in _BARE_MD.findall(text):
        if not resolves(ref, [folder, root], root):
            bad.append(f"markdown file: {ref}")
    in_configs = where is not None and where.startswith("configs/") and where.endswith((".yaml", ".yml"))
    if in_configs:
        for ref in _YAML_PATH.findall(text):
            if not ref.startswith("configs/") and not resolves(ref, [folder, root / "configs"], root):
                bad.append(f"config path: {ref}")
    return bad


# ------------------------------------------------------------------------------------------- the repository
FILES = repository_files()
TOPS = top_level_folders(FILES)
SCANNED = [n for n in FILES if Path(n).suffix in TEXT_SUFFIXES and n != "LICENSE"]


def test_the_scan_covers_the_repository():
    # A broken file listing would make every other test here pass vacuously.
    assert {"configs", "docs", "masksub_lightning", "tests"} <= set(TOPS)
    for expected in ("README.md", "docs/method.md", "docs/recipes.md", "configs/README.md"):
        assert expected in SCANNED
    assert sum(n.startswith("configs/") for n in SCANNED) >= 60
    assert any(n.startswith("tests/") for n in SCANNED) and any(n.startswith("notebooks/") for n in SCANNED)


@pytest.mark.parametrize("name", SCANNED)
def test_every_reference_in_the_file_resolves(name):
    try:
        text = (ROOT / name).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        pytest.skip("not a text file")
    assert unresolved_references(text, name, ROOT, TOPS) == [], f"{name} refers to files that do not exist"


def test_docs_method_md_is_referenced_and_exists():
    # The page ~150 places point to: it exists, and the recipes and the package do point to it by path.
    assert (ROOT / "docs/method.md").is_file()
    mentions = [
        n for n in SCANNED if "docs/method.md" in (ROOT / n).read_text(encoding="utf-8", errors="ignore")
    ]
    assert any(n.startswith("configs/") for n in mentions) and any(
        n.startswith("masksub_lightning/") for n in mentions
    )


def test_masksub_recipes_output_references_resolve(capsys):
    recipes_main(["--configs", str(CONFIGS)])
    table = capsys.readouterr().out
    recipes_main(["--configs", str(CONFIGS), "--json"])
    listing = capsys.readouterr().out
    entries = json.loads(listing)
    assert len(entries) >= 60 and len(table.splitlines()) >= len(entries)

    assert unresolved_references(table, None, ROOT, TOPS) == []
    assert unresolved_references(listing, None, ROOT, TOPS) == []
    for entry in entries:
        for key in ("path", "twin", "pretrained_from", "result_after"):
            if entry.get(key) is not None:
                assert (CONFIGS / entry[key]).is_file(), (
                    f"{entry['path']}: {key} {entry[key]} is not under configs/"
                )
        assert entry["path"] in table


# --------------------------------------------------------------------------------- the checker can fail
# Built into the texts below with f-strings, so that this file does not itself hold a broken reference.
MISSING = "nope"
MD = ".md"
BAD_ALTERNATIVES = "{401,802}"


def test_checker_flags_missing_files():
    text = f"See docs/{MISSING}.md and configs/deit3/{MISSING}.yaml; {MISSING}.md is gone."
    assert unresolved_references(text, "README.md", ROOT, TOPS) == [
        f"path: docs/{MISSING}.md",
        f"path: configs/deit3/{MISSING}.yaml",
        f"markdown file: {MISSING}.md",
    ]
    links = f"[a](docs/{MISSING}.md) [b](https://example.com/x.md) [c](#anchor) [d](configs/README.md#paper-targets)"
    assert unresolved_references(links, "README.md", ROOT, TOPS) == [
        f"markdown link: docs/{MISSING}.md",
        f"path: docs/{MISSING}.md",
    ]
    # Relative to the file: the docs page exists next to docs/recipes.md, not next to configs/README.md.
    assert unresolved_references(f"[m](method{MD})", "docs/recipes.md", ROOT, TOPS) == []
    assert unresolved_references(f"[m](method{MD})", "configs/README.md", ROOT, TOPS) == [
        f"markdown link: method{MD}",
        f"markdown file: method{MD}",
    ]
    assert unresolved_references(f"see method{MD}", "configs/deit3/vit_small_400ep.yaml", ROOT, TOPS) == [
        f"markdown file: method{MD}"
    ]
    # A folder mention.
    assert unresolved_references(f"configs/{MISSING}/ and configs/_base/", "x.py", ROOT, TOPS) == [
        f"path: configs/{MISSING}/"
    ]


def test_checker_resolves_globs_placeholders_and_config_relative_yaml():
    ok = (
        "configs/deit3/vit_*_{400,800}ep.yaml configs/<family>/ configs/mae/vit_*.yaml configs/**/*.yaml "
        "docs/method.md README.md"
    )
    assert unresolved_references(ok, "docs/recipes.md", ROOT, TOPS) == []
    wrong = f"configs/deit3/vit_*_{BAD_ALTERNATIVES}ep.yaml"
    assert unresolved_references(wrong, "x.py", ROOT, TOPS) == [f"path: {wrong}"]
    # In configs/: paths from the file's folder (`config:` includes) or from configs/ (header twins).
    yaml_text = f"config: ../_base/deit3.yaml\n#   twin: mae/vit_base.yaml\n#   twin: mae/{MISSING}.yaml\n"
    assert unresolved_references(yaml_text, "configs/deit3/vit_small_400ep.yaml", ROOT, TOPS) == [
        f"config path: mae/{MISSING}.yaml"
    ]
    # Not references to this repository: the authors' files, URLs, other projects' paths.
    foreign = "deit/README.md, mae/main_finetune.py, https://github.com/naver-ai/augsub/blob/main/README.md"
    assert unresolved_references(foreign, "docs/recipes.md", ROOT, TOPS) == []


def test_checker_flags_a_broken_recipe_listing(tmp_path, capsys):
    configs = tmp_path / "configs" / "fam"
    configs.mkdir(parents=True)
    header = (
        "# recipe:\n#   title: t\n#   model: m\n#   epochs: 1\n#   sub_branch: mask\n#   global_batch: 8\n"
        f"#   top1: null\n#   paper: not in docs/{MISSING}.md\n#   source: s\n#   twin: fam/{MISSING}.yaml\n"
    )
    (configs / "a.yaml").write_text(header + "trainer.max_epochs: 1\n")
    recipes_main(["--configs", str(tmp_path / "configs"), "--json"])
    entry = json.loads(capsys.readouterr().out)[0]
    assert not (tmp_path / "configs" / entry["twin"]).is_file()
    assert unresolved_references(entry["paper"], None, ROOT, TOPS) == [f"path: docs/{MISSING}.md"]
