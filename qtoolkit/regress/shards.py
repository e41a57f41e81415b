"""The regression job in parts: `--shard i/n` runs every n-th case, `--merge` joins the parts' reports.

    python -m qtoolkit.regress --config C --shard 1/2 --output part1     # on one CI runner
    python -m qtoolkit.regress --config C --shard 2/2 --output part2     # on another
    python -m qtoolkit.regress --merge part1,part2 --output report       # report.json/.md/.xml of the whole job

Shard i of n takes the cases at positions i-1, i-1+n, i-1+2n, ... of the
config (round robin: the slow QAT cases of one entry spread over runners).
Each part's report.json records its shard, the config and every result with
its position, so the merge puts the results back in the config's order and
writes the same report.json (but for wall times), report.md and report.xml as
one unsharded run; it refuses parts of different configs, a missing or
repeated shard.  Exit codes as for a run: 1 when a merged case failed.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from qtoolkit.regress.config import ConfigError


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"i/n" (1 <= i <= n) -> (i, n); None -> None.

    Raises:
      ConfigError: not of the form i/n with 1 <= i <= n.
    """
    if not text:
        return None
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: give i/n with 1 <= i <= n (e.g. 1/2 and 2/2 on two runners)")
    return i, n


def select(cases, shard: Optional[tuple[int, int]]) -> list[tuple[int, object]]:
    """(position in the config, case) of the cases shard (i, n) runs; every case without a shard."""
    indexed = list(enumerate(cases))
    if shard is None:
        return indexed
    i, n = shard
    return indexed[i - 1::n]


def read_parts(folders: list[str]) -> tuple[dict, list[dict]]:
    """The parts' report.json files -> (the first part's report, every result in the config's order).

    Raises:
      ConfigError: a folder without report.json, parts of different configs or shard counts, a shard missing
        or given twice, or a report that is not a shard's.
    """
    reports = []
    for folder in folders:
        path = os.path.join(folder, "report.json")
        try:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--merge: cannot read {path} ({getattr(e, 'strerror', None) or e}); give the "
                              "--output folders of the shard runs") from None
    if any(not isinstance(r.get("shard"), list) for r in reports):
        raise ConfigError("--merge: every part must come from a run with --shard i/n")
    configs = {r["config"] for r in reports}
    counts = {r["shard"][1] for r in reports}
    if len(configs) > 1 or len(counts) > 1:
        raise ConfigError(f"--merge: the parts come from different configs or shard counts ({', '.join(configs)}; "
                          f"n = {', '.join(map(str, sorted(counts)))})")
    n = counts.pop()
    have = sorted(r["shard"][0] for r in reports)
    if have != list(range(1, n + 1)):
        missing = sorted(set(range(1, n + 1)) - set(have))
        repeated = sorted({i for i in have if have.count(i) > 1})
        raise ConfigError(f"--merge: shards of {n}: " + "; ".join(
            ([f"missing {', '.join(f'{i}/{n}' for i in missing)}"] if missing else [])
            + ([f"given twice {', '.join(f'{i}/{n}' for i in repeated)}"] if repeated else [])))
    results = sorted((_numbers(c) for r in reports for c in r["cases"]), key=lambda c: c["position"])
    return reports[0], results


def _numbers(obj):
    """JSON's "inf"/"-inf"/"nan" strings (see reports.clean_json) back to floats."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return float(obj) if obj in ("inf", "-inf", "nan") else obj
