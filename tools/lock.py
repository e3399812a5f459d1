"""`make lock`: rewrite constraints.txt from `pip freeze --all --exclude-editable` of a venv that `make install`'s
steps built (the Makefile makes a fresh one under /tmp).

    pip freeze --all --exclude-editable | python tools/lock.py constraints.txt

Every pin already in the file keeps its place and its comments, with the frozen version; a pin of a distribution
the venv no longer holds is dropped; every other frozen distribution goes, sorted, under the MARKER comment at the
end (that section is rewritten each time). Versions lose their local label (torch 2.14.1+cu130 -> torch==2.14.1):
the index picks torch's build, the file its version (see the file's header). Standard library only.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

MARKER = "# Everything else `make install` puts in the venv (what the above need), pinned by `make lock`:"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#;]+)(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def frozen_versions(lines) -> dict[str, tuple[str, str]]:
    """{canonical name: (name as pip spells it, version without +local)} of `pip freeze` lines."""
    out = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(("#", "-")):
            continue
        m = PIN.match(line)
        if not m:
            raise SystemExit(f"lock: cannot read the frozen line {line!r} (expected name==version)")
        out[canonical(m.group(1))] = (m.group(1), m.group(2).split("+", 1)[0])
    return out


def relock(text: str, frozen: dict[str, tuple[str, str]], skip: set[str] = frozenset()) -> str:
    """The constraints file `text` with the versions of `frozen` (see the module's docstring)."""
    rest = {k: v for k, v in frozen.items() if k not in skip}
    kept = []
    for line in text.split(MARKER, 1)[0].splitlines():
        m = PIN.match(line)
        if not m:
            kept.append(line)
            continue
        name = canonical(m.group(1))
        if name in rest:
            kept.append(f"{m.group(1)}=={rest.pop(name)[1]}{m.group(3)}")
    while kept and not kept[-1].strip():
        kept.pop()
    tail = [f"{spelled}=={version}" for _, (spelled, version) in sorted(rest.items())]
    return "\n".join(kept + [MARKER] + tail) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    frozen = frozen_versions(sys.stdin.read().splitlines())
    if "torch" not in frozen:
        raise SystemExit("lock: the frozen venv holds no torch; refusing to write a lock without it")
    new = relock(path.read_text(encoding="utf-8"), frozen, skip={"ich-soups"})
    path.write_text(new, encoding="utf-8")
    print(f"lock: {path}: {sum(1 for line in new.splitlines() if PIN.match(line))} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
