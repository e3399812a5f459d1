"""Resume safety: which earlier sweep run `--resume` continues, and whether its Tune state may be read.

Tuner.restore unpickles tuner.pkl from the folder a sweep run's `ich.tune_path` tag names, and anyone who can
write MLflow tags can rewrite that tag: the folder must lie under the storage root this sweep writes to.
"""
from __future__ import annotations

import os
from pathlib import Path

from soups.store.tags import KIND_SWEEP, TAG_KIND, TAG_SWEEP, TAG_TUNE_PATH

def find_resume_run(client, experiment_id: str, sweep: str, experiment: str, storage: str):
    """The latest run of `sweep` to resume. Its `ich.tune_path` tag says where the Tune state is, and
    Tuner.restore unpickles tuner.pkl from there: anyone who can write MLflow tags could point it at a
    pickle of their own. So the tag must name a folder under the storage root this sweep writes to."""
    from ich.errors import ConfigError
    from soups.store import retry
    runs = retry.call_with_retry("search sweep runs", client.search_runs, [experiment_id],
                                    filter_string=f"tags.`{TAG_KIND}` = '{KIND_SWEEP}' AND tags.`{TAG_SWEEP}` = '{sweep}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or not runs[0].data.tags.get(TAG_TUNE_PATH):
        raise ConfigError(f"--resume: sweep {sweep!r} has no earlier run to resume in experiment {experiment!r}")
    tune_path = runs[0].data.tags[TAG_TUNE_PATH]
    if not under_storage_root(tune_path, storage):
        raise ConfigError(f"--resume: ich.tune_path {tune_path!r} of sweep run {runs[0].info.run_id} is outside the "
                          f"storage root {storage!r}; refusing to restore Tune state from it (resume with the "
                          f"--storage / $ICH_STORAGE the sweep was started with)")
    return runs[0]


def under_storage_root(path: str, root: str) -> bool:
    """True when `path` names a folder strictly inside `root`: both local (after resolving `..` and symlinks
    of both), or both the same remote store (scheme, bucket and query equal) with path segments that extend
    the root's and contain no `.`/`..`/empty segment (object stores do not collapse them; refuse instead)."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    def local(s: str):
        u = urlsplit(s)
        if len(u.scheme) <= 1:  # no scheme (or a Windows drive letter)
            return s
        if u.scheme.lower() == "file" and u.netloc in ("", "localhost") and not u.query and not u.fragment:
            return unquote(u.path)
        return None

    if "\0" in path or "\0" in root:
        return False
    lp, lr = local(path), local(root)
    if lp is not None or lr is not None:
        if lp is None or lr is None or not lp or not lr:
            return False
        rp, rr = Path(os.path.realpath(lp)), Path(os.path.realpath(lr))
        return rp != rr and rp.is_relative_to(rr)
    up, ur = urlsplit(path), urlsplit(root)
    if (up.scheme.lower(), up.netloc) != (ur.scheme.lower(), ur.netloc) or up.fragment or ur.fragment \
            or sorted(parse_qsl(up.query, keep_blank_values=True)) != sorted(parse_qsl(ur.query, keep_blank_values=True)):
        return False
    segs = unquote(up.path).strip("/").split("/")
    root_segs = [s for s in unquote(ur.path).strip("/").split("/") if s]
    if any(s in ("", ".", "..") for s in segs):
        return False
    return len(segs) > len(root_segs) and segs[:len(root_segs)] == root_segs
