"""Keep DVC's own files readable across a killed `dvc repro`.

DVC rewrites two files in place (open for writing, which empties them, then dump): `dvc.lock`
after every stage, and `.dvc/tmp/rwlock` (which running dvc processes hold which paths) around
every stage. A SIGKILL (or a power cut) at that moment leaves a file cut short, and every later
`dvc repro` stops with "'./dvc.lock' validation failed" or "Unable to read RWLock-file". Both were
seen in this project's fault tests. `./run.sh repro` (and `./run.sh dvc repro|exp ...`) runs this
first:

- `dvc.lock` valid (DVC's own schema) or absent: copy it to `.dvc/tmp/dvc.lock.good`;
- `dvc.lock` unreadable and a copy exists: put the copy back and say so in one line. The copy is
  the lock from before the run that was killed; stages that run completed no longer match it, so
  the `dvc repro` that follows runs them again or restores them from DVC's run cache;
- unreadable and no copy: one `error:` line naming the file and the way out, exit status 1;
- `.dvc/tmp/rwlock` unreadable: removed (under DVC's own lock of it), with one line. It only lists
  the dvc processes running now, and one that left it cut short was killed.

    python -m stages.lib.lockfile_guard [project directory]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

LOCK = "dvc.lock"
COPY = Path(".dvc") / "tmp" / "dvc.lock.good"
RWLOCK = Path(".dvc") / "tmp" / "rwlock"


def problem(lock: Path) -> str | None:
    """Why `lock` is not a lock file DVC can read, or None if it is."""
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils.serialize import parse_yaml

    try:
        text = lock.read_text(encoding="utf-8")
        data = parse_yaml(text, str(lock)) or {}
        COMPILED_LOCKFILE_SCHEMA(data)
    except Exception as exc:  # any parse or schema error: DVC would refuse this file
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def clear_broken_rwlock(project: Path) -> bool:
    """Remove `.dvc/tmp/rwlock` if DVC could not read it; returns whether it did."""
    from dvc.lock import make_lock
    from dvc.rwlock import SCHEMA

    path = project / RWLOCK
    if not path.exists():
        return False
    with make_lock(str(path.with_name("rwlock.lock")), tmp_dir=str(path.parent), hardlink_lock=False, wait=True):
        try:
            SCHEMA(json.loads(path.read_text(encoding="utf-8")))
            return False
        except Exception:  # what DVC reports as corrupted or a format error
            path.unlink()
    print(f"run.sh: {RWLOCK} was unreadable (cut short by a killed dvc run); removed it "
          "(it lists running dvc processes only)", file=sys.stderr)
    return True


def guard(project: Path) -> str:
    """Check `project`/dvc.lock, keep a copy of a good one, restore the copy over a bad one;
    returns what was done. Raises SystemExit with one line when nothing can be done."""
    lock, copy = project / LOCK, project / COPY
    if not lock.exists():
        return "no dvc.lock yet"
    why = problem(lock)
    if why is None:
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(copy.name + ".partial")
        shutil.copyfile(lock, partial)
        os.replace(partial, copy)  # the copy itself is never half-written
        return "dvc.lock ok, copy kept"
    if not copy.exists() or problem(copy) is not None:
        raise SystemExit(f"error: {LOCK} is unreadable ({why[:120]}) and no good copy was kept; "
                         f"restore it with `git checkout {LOCK}`, then run ./run.sh repro")
    shutil.copyfile(copy, lock)
    message = (f"{LOCK} was unreadable (cut short by a killed dvc run?); restored the copy taken before "
               f"that run ({COPY}); dvc repro re-runs or restores what changed since")
    print(f"run.sh: {message}", file=sys.stderr)
    return "restored"


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    clear_broken_rwlock(where)
    guard(where)
