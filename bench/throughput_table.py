"""train_throughput.py's table: one row per arm, speed and memory as ratios to hf's and Unsloth's runs of the same
shape and checkpointing mode in the same call."""

from __future__ import annotations

BASES = {4: " (nf4 base)", 8: " (int8 base)"}  # a result's `bits`: its frozen base's bitsandbytes storage


def table(results: list[dict]) -> str:
    """One row per arm; speed and peak allocated memory also as ratios to hf's and to Unsloth's run of
    the same shape and checkpointing mode (the issue's targets are ratios to Unsloth)."""
    rows = [
        "| shape, mbs | grad ckpt | arm | tokens/s | × hf | × unsloth | MFU | SM MHz / W | peak alloc / reserved GiB | "
        "alloc × unsloth | loss first → last | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    done = [r for r in results if "tokens_per_s" in r]
    by_arm = {(r["arm"], r["shape"], r["gc"]): r for r in done}

    def ratio(r: dict, arm: str, key: str) -> str:
        ref = by_arm.get((arm, r["shape"], r["gc"]))
        return f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"

    for r in results:
        if "tokens_per_s" not in r:
            last = [line for line in (r.get("error") or "?").splitlines() if line.strip()][-1:] or ["?"]
            rows.append(f"| {r.get('args')} | | | error: {last[0][:160].replace('|', '/')} | | | | | | | | |")
            continue
        rows.append(
            f"| {r['shape']}, {r['mbs']}{' (full-length)' if r.get('full_length') else ''}"
            f"{BASES.get(r.get('bits'), '')}{' (unpacked)' if r.get('unpacked') else ''} | "
            f"{'on' if r['gc'] else 'off'} | {r['arm']} | {r['tokens_per_s']:,} | {ratio(r, 'hf', 'tokens_per_s')} | "
            f"{ratio(r, 'unsloth', 'tokens_per_s')} | {r['mfu']:.1%} | "
            f"{r.get('sm_mhz') or '-'} / {r.get('power_w') or '-'} | {r['peak_alloc_gib']} / "
            f"{r['peak_reserved_gib']} | "
            f"{ratio(r, 'unsloth', 'peak_alloc_gib')} | {r['loss_first']} → {r['loss_last']} | "
            f"{', '.join(r['kernels']) or '-'} |"
        )
    if any(r["arm"] == "unsloth" and not r.get("full_length") for r in done):
        rows.append(
            "\nunsloth, packed: each step's rows end to end as one row with `packed_seq_lengths` (its padding-free "
            "layout; it splits attention per sample only so), the same tokens and targets as the other arms."
        )
    return "\n".join(rows)
