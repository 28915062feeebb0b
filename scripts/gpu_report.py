"""Markdown tables for the GPU measurements (scripts/bench_gpu.py, scripts/gpu_proof.py)."""

from __future__ import annotations

from typing import Any


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def bench_table(report: dict[str, Any]) -> str:
    """scripts/bench_gpu.py's report as markdown: the presets, then the memory plans. A row
    that failed or was skipped says so in its place (its reason is in the report)."""
    versions = report.get("versions", {})
    lines = [
        f"{report.get('device', '?')}, torch {versions.get('torch')}, diffusers {versions.get('diffusers')}, "
        f"{report.get('size')}, {report.get('steps')} steps, median of {report.get('runs')}, "
        f"memory plan {report.get('memory_plan', 'n/a')}; "
        f"matmul {fmt(report.get('matmul_tflops'), '.3g')} TFLOP/s, "
        f"floor {fmt(report.get('floor_s'), '.3g')} s",
        "",
        "| mode | ran | s/image | warm-up s | peak GiB | vs baseline | vs floor | block work "
        "| latent rel. error | graphs / breaks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.get("rows", []):
        if "seconds" not in row:
            lines.append(f"| {row['mode']} | {_not_measured(row)} | | | | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {row['ran']} | {row['seconds']:.3f} | {row['warmup_s']:.1f} "
            f"| {fmt(row['peak_gib'], '.1f')} | {fmt(row['vs_baseline'], '.2f', 'x')} "
            f"| {fmt(row['vs_floor'], '.2f', 'x')} | {fmt(row['block_work'], '.0%')} "
            f"| {fmt(row['rel_error'], '.2e')} "
            f"| {row.get('graphs', 'n/a')} / {row.get('graph_breaks', 'n/a')} |"
        )
    notes = [f"- {row['mode']}: {row['note']}" for row in report.get("rows", []) if row.get("note")]
    notes += [
        f"- {row['mode']}: graph breaks {row['graph_break_reasons']}"
        for row in report.get("rows", [])
        if row.get("graph_break_reasons")
    ]
    lines += ["", *notes] if notes else []
    lines += _tuning_table(report.get("rows", []))
    if report.get("memory_plans"):
        lines += [
            "",
            "| memory plan | steps | s/image | resident GiB | peak GiB | expected peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for plan in report["memory_plans"]:
            if "seconds" not in plan:
                lines.append(f"| {plan['plan']} | {_not_measured(plan)} | | | | |")
                continue
            lines.append(
                f"| {plan['plan']} | {plan['steps']} | {plan['seconds']:.2f} "
                f"| {fmt(plan['resident_gib'], '.1f')} | {fmt(plan['peak_gib'], '.1f')} "
                f"| {fmt(plan['expected_peak_gib'], '.0f')} |"
            )
    return "\n".join(lines)


def _tuning_table(rows: list[dict[str, Any]]) -> list[str]:
    """The tuning rows again, beside `regular`: a piece is kept only where it runs and is faster."""
    tuning = [row for row in rows if row["mode"].startswith("regular + ")]
    if not tuning:
        return []
    lines = [
        "",
        "| on top of `regular` | the pieces ran | s/image | vs regular | warm-up s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in tuning:
        if "seconds" not in row:
            lines.append(f"| {row['mode']} | {_not_measured(row)} | | | | |")
            continue
        asked = row["mode"].split(" + ")[1:]
        missing = [piece for piece in asked if piece not in row.get("tuning_ran", [])]
        ran = "yes" if not missing else f"no ({', '.join(missing)}: see its note)"
        lines.append(
            f"| {row['mode']} | {ran} | {row['seconds']:.3f} | {fmt(row.get('vs_regular'), '.3f', 'x')} "
            f"| {row['warmup_s']:.1f} | {fmt(row['peak_gib'], '.1f')} |"
        )
    return lines


def _not_measured(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    return f"FAILED: {str(row.get('error', 'no figures')).splitlines()[0][:200]}"


def _target(what: str, value: float | None, limit: float, unit: str, spec: str = ".2f") -> str:
    verdict = "not measured" if value is None else ("met" if value <= limit else "MISSED")
    return f"| {what} | {fmt(value, spec, unit)} | <= {limit:g}{unit} | {verdict} |"


def targets_table(reports: dict[str, Any]) -> list[str]:
    """Each figure issue 11 sets a target for, measured or not, met or missed (never hidden)."""
    bench, serve = reports.get("bench"), reports.get("serve")
    rows = {row["mode"]: row for row in (bench or {}).get("rows", [])}
    regular = rows.get("preset regular", {}).get("vs_baseline")
    high = rows.get("preset high", {}).get("vs_baseline")
    presets = [row for mode, row in rows.items() if mode.startswith("preset")]
    floors = [row["vs_floor"] for row in presets if row.get("vs_floor")]
    single = (serve or {}).get("single", {})
    burst = (serve or {}).get("burst", {})
    return [
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
        _target("`regular` vs bf16 eager", regular, 0.4, "x"),
        _target("`high` (fixed skip schedule) vs bf16 eager", high, 0.3, "x"),
        _target("best preset vs the bf16 compute floor", min(floors) if floors else None, 1.2, "x"),
        _target("what the server adds per request", single.get("median_server_adds_ms"), 50, " ms", ".0f"),
        _target("ready after start (cold)", (serve or {}).get("ready_cold_s"), 180, " s", ".1f"),
        _target("ready after start (warm compile cache)", (serve or {}).get("ready_warm_s"), 60, " s", ".1f"),
        _target("largest idle gap between queued jobs", burst.get("max_idle_gap_ms"), 20, " ms", ".1f"),
    ]


def serve_table(serve: dict[str, Any]) -> list[str]:
    single, burst = serve.get("single", {}), serve.get("burst", {})
    missing = "not measured"

    def seconds(value: float | None, spec: str = ".1f") -> str:
        return missing if value is None else f"{value:{spec}} s"

    lines = [
        f"flux-server serve --model {serve['model']} on {serve['device']}, {serve['size']}, "
        f"{serve['steps']} steps, real fal_client {serve.get('fal_client') or ''}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| ready after start, cold | {seconds(serve.get('ready_cold_s'))} |",
        f"| ready after start, warm compile cache | {seconds(serve.get('ready_warm_s'))} |",
        f"| one request end to end (fal_client.run, `{single.get('acceleration', '')}`) "
        f"| {seconds(single.get('median_end_to_end_s'), '.3f')} |",
        f"| the pipeline call alone (worker's inference timing) "
        f"| {seconds(single.get('median_inference_s'), '.3f')} |",
        f"| what the server adds | {fmt(single.get('median_server_adds_ms'), '.0f', ' ms')} |",
        f"| {burst.get('requests', 'N')} requests at once: images per minute "
        f"| {fmt(burst.get('images_per_minute'), '.1f')} |",
        f"| idle gap between queued jobs, median / max | {fmt(burst.get('median_idle_gap_ms'), '.1f')} / "
        f"{fmt(burst.get('max_idle_gap_ms'), '.1f', ' ms')} |",
    ]
    if serve.get("presets"):
        lines += ["", "| acceleration asked | ran | note |", "|---|---|---|"]
        lines += [f"| {p['requested']} | {p['ran']} | {p['note'] or ''} |" for p in serve["presets"]]
    return lines


def problems(reports: dict[str, Any]) -> list[str]:
    """Every step that failed or was skipped, with its reason."""
    lines = []
    for part, report in reports.items():
        if report.get("error"):
            lines.append(f"- {part}: {report['error']}")
        lines += [f"- {part} {name}: {why}" for name, why in report.get("errors", {}).items()]
        lines += [f"- {part} skipped {why}" for why in report.get("skipped", [])]
        for section, key in (("rows", "mode"), ("memory_plans", "plan")):
            lines += [
                f"- {part} {row[key]}: {_not_measured(row)}"
                for row in report.get(section, [])
                if "seconds" not in row
            ]
    return lines


def proof_table(reports: dict[str, Any]) -> str:
    """scripts/gpu_proof.py's summary: the targets, what failed, then each part's tables."""
    lines = ["## Targets", "", *targets_table(reports)]
    if trouble := problems(reports):
        lines += ["", "## Failed or skipped", "", *trouble]
    if reports.get("bench", {}).get("rows"):
        lines += ["", "## Presets and memory plans (scripts/bench_gpu.py)", "", bench_table(reports["bench"])]
    if "serve" in reports:
        lines += ["", "## The server end to end", "", *serve_table(reports["serve"])]
    return "\n".join(lines)
