"""docs/results.md from the measured numbers, so that no table is copied by hand.

Each benchmark appends one JSON object per measurement to ``benchmarks/results/<benchmark>.jsonl`` (with the
machine and the date), and this script renders those lines into the prose of ``benchmarks/results/results.md.in``:

    python benchmarks/write_results.py            # rewrite docs/results.md
    python benchmarks/write_results.py --check    # exit 1 if docs/results.md is not what the numbers give

A template line ``{{ FILE STUDY }}`` becomes a table of the records of ``FILE.jsonl`` whose ``study`` is STUDY: one
row per ``setting``, one column per ``sampling``, each cell ``FID / IS`` (the newest record of a setting and sampling
wins, so a re-run replaces its row). ``{{ FILE STUDY | key=Header; key=Header:% }}`` lists the records instead, one
row each (keyed by the first column), ``:%`` printing a fraction as a percentage. Under every table: the machines
and dates its numbers were measured on.
"""

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
TEMPLATE = RESULTS / "results.md.in"
PAGE = ROOT / "docs/results.md"
DIRECTIVE = re.compile(r"^\{\{\s*(\w+)\s+(\w+)\s*(?:\|\s*(.*?))?\s*\}\}$")
HEADER = "<!-- Written by benchmarks/write_results.py from benchmarks/results/*.jsonl: edit those, not this page. -->\n"


def machine() -> str:
    """The device a benchmark ran on, in the words of benchmarks/throughput.py's ``device``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def append(name: str, records: list[dict], results: Path = RESULTS) -> None:
    """Add measurements to ``<name>.jsonl``, stamped with this machine and today's date unless they say."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{name}.jsonl", "a") as f:
        for record in records:
            record.setdefault("date", datetime.date.today().isoformat())
            if "machine" not in record:
                record["machine"] = machine()
            f.write(json.dumps(record) + "\n")


def read(name: str, study: str, results: Path) -> list[dict]:
    path = results / f"{name}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = [r for r in records if r.get("study") == study]
    if not chosen:
        raise ValueError(f"{path} holds no record of study {study!r}")
    return chosen


def cell(value, fmt: str = "") -> str:
    if value is None:
        return "-"
    if fmt == "%":
        return f"{100 * value:.1f} %"
    if isinstance(value, list):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return str(value)


def extra(record: dict, key: str) -> str:
    if key == "ts" and "sigma_mid" in record:
        return f"{cell(record['ts'])}, sigma = {record['sigma_mid']}"
    return cell(record[key])


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def pivot(records: list[dict]) -> list[str]:
    """Settings down, samplings across; the searched midpoint's ts and any note in columns of their own."""
    table: dict[str, dict[str, dict]] = {}
    samplings: dict[str, None] = {}
    for r in records:
        table.setdefault(r["setting"], {})[r["sampling"]] = r
        samplings.setdefault(r["sampling"], None)
    with_is = any(r.get("is") is not None for r in records)
    header = ["setting", *(f"{s}: FID / IS" if with_is else s for s in samplings)]
    extras = [k for k in ("ts", "note") if any(k in r for r in records)]
    header += ["searched ts" if k == "ts" else k for k in extras]
    rows = []
    for setting, by_sampling in table.items():
        row = [setting]
        for s in samplings:
            r = by_sampling.get(s)
            if r is None:
                row.append("")
            else:
                row.append(f"{cell(r['fid'])} / {cell(r.get('is'))}" if with_is else cell(r["fid"]))
        for k in extras:
            row.append("; ".join(dict.fromkeys(extra(r, k) for r in by_sampling.values() if k in r)))
        rows.append(row)
    return markdown(header, rows)


def columns(spec: str) -> list[tuple[str, str, str]]:
    """``key=Header:fmt; ...`` as (key, header, fmt)."""
    out = []
    for item in spec.split(";"):
        key, _, header = item.strip().partition("=")
        header, _, fmt = header.partition(":")
        out.append((key.strip(), header.strip(), fmt.strip()))
    return out


def newest(records: list[dict], key) -> list[dict]:
    """One record per key, the last appended, in the order the keys first appeared."""
    kept: dict = {}
    for r in records:
        kept[key(r)] = r
    return list(kept.values())


def listing(records: list[dict], spec: list[tuple[str, str, str]]) -> list[str]:
    return markdown([h for _, h, _ in spec], [[cell(r.get(k), fmt) for k, _, fmt in spec] for r in records])


def measured_on(records: list[dict]) -> str:
    dates: dict[str, set] = {}
    for r in records:
        dates.setdefault(r.get("machine", "machine not recorded"), set()).add(r.get("date", "date not recorded"))
    return "Measured on " + "; ".join(f"{m}, {', '.join(sorted(d))}" for m, d in dates.items()) + "."


def render(template: Path = TEMPLATE, results: Path = RESULTS) -> str:
    out = [HEADER]
    for line in template.read_text().splitlines():
        found = DIRECTIVE.match(line.strip())
        if not found:
            out.append(line + "\n")
            continue
        name, study, spec = found.groups()
        if spec:
            spec = columns(spec)
            first = spec[0][0]
            records = newest(read(name, study, results), lambda r, first=first: r.get(first))
            lines = listing(records, spec)
        else:
            records = newest(read(name, study, results), lambda r: (r["setting"], r["sampling"]))
            lines = pivot(records)
        out.append("\n".join([*lines, "", measured_on(records)]) + "\n")
    return "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare docs/results.md with the numbers")
    args = parser.parse_args()
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            sys.exit(f"{PAGE} is not what benchmarks/results/ gives: run python benchmarks/write_results.py")
        return
    PAGE.write_text(page)
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
