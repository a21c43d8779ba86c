"""``cosyvoice2 compare``: paired comparison of two eval reports on synthetic reports built here.

No model, corpus or ASR: each report is a list of items with edit counts and similarities chosen so the
verdict is known (identical runs, a much worse run, a noisy difference on three sentences).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from cosyvoice2 import InputError, cli
from cosyvoice2 import evaluate as ev

UNITS = 20  # reference units of every synthetic sentence


def item(
    condition: str,
    language: str,
    index: int,
    edits: int,
    *,
    similarity: float | None = None,
    seed: int = 0,
    deletions: int = 0,
    insertions: int = 0,
    guarded: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """One scored item; ``edits`` are substitutions, ``guarded`` the loop-guarded (S, D, I), if any."""
    out: dict[str, Any] = {
        "condition": condition,
        "language": language,
        "text": f"{language} sentence {index}",
        "seed": seed + index,
        "ref_units": UNITS,
        "substitutions": edits,
        "deletions": deletions,
        "insertions": insertions,
        "error_rate": (edits + deletions + insertions) / UNITS,
        "audio_s": 2.0,
    }
    if guarded is not None:
        s, d, i = guarded
        out["guarded"] = {
            "compression_ratio": 1.0,
            "redecoded": (s, d, i) != (edits, deletions, insertions),
            "substitutions": s,
            "deletions": d,
            "insertions": i,
            "error_rate": (s + d + i) / UNITS,
        }
    if condition.startswith("zero_shot"):
        out["prompt"] = {"id": f"spk-{language}-{index}"}
        out["speaker_similarity"] = similarity
    else:
        out["voice"] = f"voice{index % 3}"
    return out


def report(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": ev.REPORT_FORMAT, "version": ev.REPORT_VERSION, "items": items}


def run_items(n: int, edits: list[int], similarities: list[float]) -> list[dict[str, Any]]:
    """builtin (en, zh) and zero_shot (en) items for sentences 0..n-1."""
    out = []
    for i in range(n):
        out.append(item("builtin", "en", i, edits[i]))
        out.append(item("builtin", "zh", i, edits[i]))
        out.append(item("zero_shot", "en", i, edits[i], similarity=similarities[i]))
    return out


def rows(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["condition"], r["language"]): r for r in result["error_rate"]}


def test_identical_reports_within_budget():
    rng = random.Random(1)
    base = report(
        run_items(12, [rng.randint(0, 6) for _ in range(12)], [rng.uniform(0.6, 0.9) for _ in range(12)])
    )
    result = ev.compare_reports(base, json.loads(json.dumps(base)), n_boot=300)
    assert result["matched"] == 36 and result["unmatched"]["base"] == result["unmatched"]["other"] == 0
    for r in result["error_rate"] + result["miss_rate"] + result["speaker_similarity"]:
        assert r["delta"] == 0 and r["ci"] == [0, 0] and r["verdict"] == ev.VERDICT_WITHIN
        assert r["base"] == r["other"] and r["n"] == 12
    assert result["error_rate_guarded"] == []  # reports without the loop guard: not compared
    # The corpus-level rate is summed edits over summed units, as summarize() has it.
    summary = ev.summarize(base["items"])
    assert rows(result)["builtin", "zh"]["base"] == summary["builtin"]["languages"]["zh"]["error_rate"]
    assert [r["condition"] for r in result["speaker_similarity"]] == ["zero_shot"]
    text = ev.format_comparison(result)
    assert "builtin            en WER" in text and "within budget" in text and "unmatched" not in text
    (miss,) = [r for r in result["miss_rate"] if (r["condition"], r["language"]) == ("builtin", "en")]
    assert miss["base"] == summary["builtin"]["languages"]["en"]["miss_rate"]
    assert f"builtin            en WER S+D {100 * miss['base']:.1f}% -> {100 * miss['base']:.1f}%" in text
    assert "loop-guarded" not in text


def test_much_worse_run_over_budget():
    base = report(run_items(10, [1] * 10, [0.8] * 10))
    other = report(run_items(10, [8] * 10, [0.7] * 10))
    result = ev.compare_reports(base, other, n_boot=300)
    for r in result["error_rate"]:
        assert r["delta"] == pytest.approx(7 / UNITS) and r["ci"][0] > 0.01
        assert r["verdict"] == ev.VERDICT_OVER
    (sim,) = result["speaker_similarity"]
    assert sim["delta"] == pytest.approx(-0.1) and sim["verdict"] == ev.VERDICT_OVER
    assert "+35.0 points" in ev.format_comparison(result)


def test_noisy_small_difference_undecided():
    base = report(run_items(3, [1, 3, 0], [0.80, 0.75, 0.82]))
    other = report(run_items(3, [3, 1, 2], [0.78, 0.79, 0.80]))
    result = ev.compare_reports(base, other, n_boot=500)
    r = rows(result)["builtin", "en"]
    assert r["delta"] == pytest.approx(2 / 60, abs=1e-4) and r["ci"][0] <= 0.01 < r["ci"][1]
    assert all(r["verdict"] == ev.VERDICT_UNDECIDED for r in result["error_rate"])
    (sim,) = result["speaker_similarity"]
    assert sim["ci"][0] < -0.01 <= sim["ci"][1] and sim["verdict"] == ev.VERDICT_UNDECIDED


def loop_items(n: int, *, loop_at: int | None, extra_deletions: int = 0) -> list[dict[str, Any]]:
    """builtin en items, 1 substitution each (guarded alike); sentence ``loop_at`` with a 95-word Whisper
    loop in the plain decode that the loop guard removed; ``extra_deletions`` on every sentence."""
    out = []
    for i in range(n):
        ins = 95 if i == loop_at else 0
        out.append(
            item(
                "builtin",
                "en",
                i,
                1,
                deletions=extra_deletions,
                insertions=ins,
                guarded=(1, extra_deletions, 0),
            )
        )
    return out


def test_loop_in_one_run_miss_and_guarded_rates():
    """One looping utterance dominates the plain error rate's delta; the miss rate and the loop-guarded
    rate see the two runs as equal, with the same bootstrap and verdict rules."""
    base, other = report(loop_items(10, loop_at=None)), report(loop_items(10, loop_at=0))
    result = ev.compare_reports(base, other, n_boot=500)
    (plain,) = result["error_rate"]
    assert (plain["base"], plain["other"], plain["delta"]) == (0.05, 0.525, 0.475)
    # resamples without sentence 0 (0.9 ** 10 = 35 % of them) have no difference: not decided either way
    assert plain["ci"][0] == 0 and plain["ci"][1] > 0.4 and plain["verdict"] == ev.VERDICT_UNDECIDED
    (miss,) = result["miss_rate"]
    (guarded,) = result["error_rate_guarded"]
    for r in (miss, guarded):
        assert (r["condition"], r["language"], r["metric"], r["n"]) == ("builtin", "en", "wer", 10)
        assert (r["base"], r["other"], r["delta"], r["ci"]) == (0.05, 0.05, 0, [0, 0])
        assert r["verdict"] == ev.VERDICT_WITHIN
    lines = ev.format_comparison(result).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("builtin            en WER 5.0% -> 52.5%"))
    assert lines[at + 1].startswith("builtin            en WER loop-guarded 5.0% -> 5.0%, delta +0.0 points")
    assert lines[at + 2].startswith("builtin            en WER S+D 5.0% -> 5.0%, delta +0.0 points")
    assert lines[at + 1].endswith("(n=10): within budget") and lines[at + 2].endswith("within budget")


def test_miss_rate_counts_substitutions_and_deletions():
    base = report(loop_items(10, loop_at=None))
    other = report(loop_items(10, loop_at=None, extra_deletions=3))  # 3 more words missed per sentence
    result = ev.compare_reports(base, other, n_boot=200)
    for key in ("error_rate", "miss_rate", "error_rate_guarded"):
        (r,) = result[key]
        assert (r["base"], r["other"], r["delta"]) == (0.05, 0.2, 0.15), key
        assert r["ci"] == [0.15, 0.15] and r["verdict"] == ev.VERDICT_OVER, key
    # insertions alone move the error rate, never the miss rate
    result = ev.compare_reports(report(loop_items(4, loop_at=None)), report(loop_items(4, loop_at=2)))
    assert result["miss_rate"][0]["delta"] == 0 and result["error_rate"][0]["delta"] == pytest.approx(95 / 80)


def test_guarded_rows_need_both_reports():
    """A report from before the loop guard (no ``guarded`` counts) still compares; its guarded rows are
    left out, also against a newer report, and for a (condition, language) only partly guarded."""
    new = loop_items(6, loop_at=1)
    old = [{k: v for k, v in it.items() if k != "guarded"} for it in new]
    for base, other in ((old, new), (new, old), (old, old)):
        result = ev.compare_reports(report(base), report(other), n_boot=100)
        assert result["error_rate_guarded"] == [] and len(result["miss_rate"]) == 1
        assert result["error_rate"][0]["delta"] == 0 and "loop-guarded" not in ev.format_comparison(result)
    partly = new[:3] + old[3:]
    assert ev.compare_reports(report(partly), report(new), n_boot=100)["error_rate_guarded"] == []
    # a comparison saved before these rows existed still prints
    saved = ev.compare_reports(report(old), report(old), n_boot=100)
    del saved["miss_rate"], saved["error_rate_guarded"]
    text = ev.format_comparison(saved)
    assert "builtin            en WER" in text and "S+D" not in text


def test_seeded_and_order_independent():
    rng = random.Random(2)
    base_items = run_items(
        8, [rng.randint(0, 8) for _ in range(8)], [rng.uniform(0.6, 0.9) for _ in range(8)]
    )
    other_items = run_items(
        8, [rng.randint(0, 8) for _ in range(8)], [rng.uniform(0.6, 0.9) for _ in range(8)]
    )
    result = ev.compare_reports(report(base_items), report(other_items), n_boot=400, seed=3)
    shuffled = other_items[:]
    random.Random(4).shuffle(shuffled)
    assert shuffled != other_items
    again = ev.compare_reports(report(base_items), report(shuffled), n_boot=400, seed=3)
    assert again == result and result["matched"] == 24
    assert ev.compare_reports(report(base_items), report(other_items), n_boot=400, seed=5) != result


def test_unmatched_items_counted_not_paired():
    base_items = run_items(5, [2] * 5, [0.8] * 5)
    # other: sentence 4 missing, a seed that differs on sentence 0's builtin en item, an extra condition
    other_items = [it for it in run_items(5, [2] * 5, [0.8] * 5) if it["text"] != "en sentence 4"]
    other_items[0] = item("builtin", "en", 0, 2, seed=100)
    other_items.append(item("teacher", "en", 0, 0))
    result = ev.compare_reports(report(base_items), report(other_items), n_boot=100)
    assert result["unmatched"]["base"] == 3 and result["unmatched"]["other"] == 2
    assert result["unmatched"]["by_condition"] == {
        "teacher": {"base": 0, "other": 1},
        "builtin": {"base": 2, "other": 1},
        "zero_shot": {"base": 1, "other": 0},
    }
    assert rows(result)["builtin", "en"]["n"] == 3 and rows(result)["builtin", "zh"]["n"] == 5
    assert ("teacher", "en") not in rows(result)
    assert "3 items only in base, 2 only in other" in ev.format_comparison(result)


def test_not_comparable_inputs():
    base = report(run_items(3, [1] * 3, [0.8] * 3))
    with pytest.raises(InputError, match="no item in common"):
        ev.compare_reports(base, report([item("builtin", "en", 9, 0)]))
    with pytest.raises(InputError, match="not a cosyvoice2 eval report"):
        ev.compare_reports(base, {"items": []})
    bad = item("builtin", "en", 0, 1) | {"ref_units": "20"}
    with pytest.raises(InputError, match="not whole numbers"):
        ev.compare_reports(base, report([bad]))
    with pytest.raises(InputError, match="lacks ref_units"):
        ev.compare_reports(base, report([{"condition": "builtin", "language": "en", "text": "x"}]))
    bad = item("builtin", "en", 0, 1, guarded=(1, 0, 0))
    bad["guarded"]["insertions"] = -1
    with pytest.raises(InputError, match="loop-guarded edit counts"):
        ev.compare_reports(base, report([bad]))


def test_compare_command(tmp_path: Path, capsys):
    base, other = tmp_path / "exact.json", tmp_path / "fast.json"
    base.write_text(json.dumps(report(run_items(4, [1, 2, 0, 1], [0.8] * 4))))
    other.write_text(json.dumps(report(run_items(4, [1, 2, 0, 1], [0.8] * 4))))
    out = tmp_path / "cmp" / "compare.json"
    assert cli.main(["compare", str(base), str(other), "--boot", "200", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "within budget" in printed and f"wrote {out}" in printed
    written = json.loads(out.read_text())
    assert written["format"] == ev.COMPARE_FORMAT and written["settings"]["n_boot"] == 200
    assert written["files"]["base"] == str(base.resolve())


def test_compare_command_errors(tmp_path: Path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report(run_items(2, [0, 1], [0.8, 0.8]))))
    not_report = tmp_path / "other.json"
    not_report.write_text(json.dumps({"hello": 1}))
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ not json")
    cases = [
        ([str(tmp_path / "missing.json"), str(good)], "eval report not found"),
        ([str(good), str(not_report)], "is not a cosyvoice2 eval report"),
        ([str(not_json), str(good)], "is not JSON"),
        ([str(good), str(good), "--boot", "0"], "at least 1"),
    ]
    for args, message in cases:
        assert cli.main(["compare", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cosyvoice2: error: ") and message in err and "\n" not in err
