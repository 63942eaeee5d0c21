"""Provenance of a rendered table, collected from its metric files' sidecars (docs/audit.md).

Each metric CSV has ``<stem>.provenance.json`` beside it (:func:`anorefiner.provenance.write_metrics_provenance`):
the run records (code, packages, device) of the stages behind it and the weight source of its coarse maps.
Per table row (a paper row of one dataset) this module gathers the records of every (seed, category) input
and says which weights and which code made it; inputs that disagree (two commits, a dirty tree and a clean
one, weights of different sources) or that record nothing are flagged. The table-level block adds the code
that rendered the table and the hash of the resolved configuration. Nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..provenance import (
    RANDOM_WEIGHTS, UNKNOWN, code_label, code_version, device_label, metrics_provenance_path, package_versions,
    settings_sha256,
)

FORMAT = "anorefiner-table-provenance/1"
MIXED = "MIXED PROVENANCE"
NOT_RECORDED = "provenance not recorded"


def read_sidecar(metrics_csv) -> dict | None:
    path = metrics_provenance_path(metrics_csv)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"provenance file {path} is not valid JSON: {err}") from err


def row_provenance(files) -> dict:
    """``{weights, code, flag, devices, versions, settings, n_inputs}`` of the inputs of one table row.

    ``weights`` and ``code`` are one line each ("; "-joined when the inputs disagree: then ``flag`` says
    so); ``devices``: stage -> device labels; ``settings``: stage -> settings hashes (they differ per
    category by design: not flagged)."""
    files = sorted(set(map(str, files)))
    weights, codes, devices, versions, settings, missing = set(), set(), {}, [], {}, []
    for f in files:
        doc = read_sidecar(f)
        if doc is None:
            missing.append(f)
            continue
        stages = dict(doc.get("stages") or {}, metrics={"run": doc.get("metrics")})
        for stage, record in stages.items():
            run = (record or {}).get("run") or {}
            codes.add(code_label(run.get("code")))
            devices.setdefault(stage, set()).add(device_label(run.get("device")))
            if run.get("versions") and run["versions"] not in versions:
                versions.append(run["versions"])
            if run.get("settings_sha256"):
                settings.setdefault(stage, set()).add(run["settings_sha256"])
            if stage != "metrics":
                source = (record or {}).get("weights")
                weights.add(source["summary"] if source else f"{UNKNOWN} (not recorded by the {stage} stage)")
    flags = []
    if len(codes) > 1:
        flags.append(f"{MIXED}: {len(codes)} code states ({'; '.join(sorted(codes))})")
    if len(weights) > 1:
        flags.append(f"{MIXED}: {len(weights)} weight sources")
    if missing:
        flags.append(f"{NOT_RECORDED} for {len(missing)} of {len(files)} inputs, e.g. "
                     f"{metrics_provenance_path(missing[0])}")
    return {"weights": "; ".join(sorted(weights)) or f"{UNKNOWN} ({NOT_RECORDED})",
            "code": "; ".join(sorted(codes)) or f"{UNKNOWN} ({NOT_RECORDED})", "flag": "; ".join(flags),
            "devices": {k: sorted(v) for k, v in devices.items()}, "versions": versions,
            "settings": {k: sorted(v) for k, v in settings.items()}, "n_inputs": len(files)}


def is_random(weights: str) -> bool:
    return RANDOM_WEIGHTS in str(weights)


def table_block(name: str, rows: list[dict], config: dict, config_sha256: str | None = None) -> dict:
    """The table's provenance document (``tables/<name>.provenance.json``).

    ``rows``: ``{dataset, row, **row_provenance}`` of every row that ran. ``config_sha256``: the hash of the
    workflow's resolved configuration (the table rule passes it); without it, the hash of ``config``."""
    stage_codes = sorted({c for r in rows for c in r["code"].split("; ")})
    devices, versions = _merge(rows)
    return {
        "format": FORMAT, "table": name,
        "rendered_by": {"code": code_version(), "versions": package_versions()},
        "config_sha256": config_sha256 or settings_sha256(config),
        "config_hash_of": "the workflow's resolved configuration" if config_sha256 else "the table's --config-json",
        "stage_code": stage_codes,
        "devices": devices,
        "versions": versions,
        "rows": rows,
    }


def _merge(items) -> tuple[dict[str, list[str]], list[dict]]:
    """The devices per stage and the distinct package-version sets of rows or table blocks."""
    devices: dict[str, set] = {}
    versions: list[dict] = []
    for item in items:
        for stage, labels in item["devices"].items():
            devices.setdefault(stage, set()).update(labels)
        versions += [v for v in item["versions"] if v not in versions]
    return {k: sorted(v) for k, v in devices.items()}, versions


def block_path(table_csv) -> Path:
    """``tables/<name>.csv`` -> ``tables/<name>.provenance.json``."""
    return Path(table_csv).with_suffix(".provenance.json")


def read_block(table_csv) -> dict | None:
    path = block_path(table_csv)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def versions_line(versions: list[dict]) -> str:
    """``torch 2.4.1, numpy 2.0.1, ...`` (the versions of every package that differ between stages listed
    with all values)."""
    if not versions:
        return f"{UNKNOWN} ({NOT_RECORDED})"
    keys = list(dict.fromkeys(k for v in versions for k in v))
    parts = []
    for k in keys:
        values = sorted({str(v.get(k, "absent")) for v in versions})
        parts.append(f"{k} {values[0]}" if len(values) == 1 else f"{k} {' / '.join(values)} ({MIXED})")
    return ", ".join(parts)


def markdown_lines(blocks: list[dict], md) -> list[str]:
    """The ``## Provenance`` section of one table's Markdown (one block) or of the audit (every table's)."""
    rendered = sorted({code_label(b["rendered_by"]["code"]) for b in blocks})
    version = sorted({str(b["rendered_by"]["code"].get("version")) for b in blocks})
    configs = sorted({f"{b['config_sha256']} ({b['config_hash_of']})" for b in blocks})
    stage_codes = sorted({c for b in blocks for c in b["stage_code"]})
    devices, versions = _merge(blocks)
    out = ["## Provenance", "",
           f"- Rendered by anorefiner {', '.join(version)} at commit {', '.join(rendered)}",
           f"- Resolved configuration sha256: {'; '.join(configs)}",
           f"- Code of the stages (coarse, refined, metrics): {'; '.join(stage_codes) or NOT_RECORDED}"
           + (f" — {MIXED}" if len(stage_codes) > 1 else ""),
           "- Devices: " + ("; ".join(f"{stage}: {', '.join(v)}" for stage, v in sorted(devices.items()))
                            or NOT_RECORDED),
           f"- Packages: {versions_line(versions)}", ""]
    rows = [(b["table"], r) for b in blocks for r in b["rows"]]
    if rows:
        out += ["| table | dataset | row | weights | code | flag |", "|---|---|---|---|---|---|"]
        for table, r in rows:
            out.append(f"| {table} | {r['dataset']} | {md(r['row'])} | {md(r['weights'])} | {md(r['code'])} | "
                       f"{md(r['flag'])} |")
        out.append("")
    return out
