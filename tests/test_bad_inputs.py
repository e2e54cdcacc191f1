"""The bad-input catalogue over the public API (tests/bad_input_catalogue.py), as tests.

Every public function of a required module has a catalogue entry; each entry's good call runs; every
generic mutation of it (wrong rank / size / dtype, NaN, inf, mixed libraries, None, wrong records,
wrong option values and combinations) gives a clear ValueError / TypeError naming the argument, or is
marked valid in the catalogue. Defects in modules owned elsewhere are catalogued issues, reported here
as strict xfails (one per issue and function) with the issue's reproduction as the reason.
"""

from __future__ import annotations

import fnmatch
import functools

import pytest

import bad_input_catalogue as cat


@functools.lru_cache(maxsize=None)
def verdicts(qualname: str) -> tuple:
    return tuple(cat.run_entry(cat.CATALOGUE[qualname]))


@functools.lru_cache(maxsize=None)
def all_verdicts() -> tuple:
    return tuple(v for q in cat.CATALOGUE for v in verdicts(q))


def _known_pairs() -> list:
    pairs = sorted({(v.detail.rsplit("[known: ", 1)[1].rstrip("]"), v.entry) for v in all_verdicts() if v.outcome == "xfail"})
    return [pytest.param(key, entry, id=f"{key}-{entry}",
                         marks=pytest.mark.xfail(strict=True, reason=f"{cat.ISSUES[key].summary} Repro: {cat.ISSUES[key].repro}"))
            for key, entry in pairs]


ENTRIES = sorted(cat.CATALOGUE)


@pytest.mark.parametrize("qualname", ENTRIES)
def test_good_call_runs(qualname):
    cat.good_call(cat.CATALOGUE[qualname])


@pytest.mark.parametrize("qualname", ENTRIES)
def test_bad_inputs_are_refused_clearly(qualname):
    failures = [v for v in verdicts(qualname) if v.outcome in cat.FAILURES]
    assert not failures, f"{len(failures)} bad inputs not refused clearly:\n" + "\n".join(
        f"  {v.outcome}: {v.mutation}: {v.detail[:300]}" for v in failures)


@pytest.mark.parametrize(("key", "qualname"), _known_pairs())
def test_known_issue(key, qualname):
    """Fails while the catalogued defect is there (xfail); an XPASS means it was fixed: narrow the issue's ``where``."""
    still = [v for v in verdicts(qualname) if v.outcome == "xfail" and v.detail.endswith(f"[known: {key}]")]
    assert not still, f"{key}: {len(still)} mutations, e.g. {still[0].mutation}: {still[0].detail[:200]}"


def test_every_known_issue_rule_still_explains_a_failure():
    """A rule of ISSUES[...].where that matches no failing mutation is stale (the defect was fixed): remove it."""
    failing = [(v.entry, v.mutation) for v in all_verdicts() if v.outcome == "xfail"]
    stale = [f"{found.key}: {entry_glob} {globs}" for found in cat.ISSUES.values() for entry_glob, globs in found.where
             if not any(fnmatch.fnmatchcase(e, entry_glob) and cat._matches(m, globs) for e, m in failing)]
    assert not stale, "stale known-issue rules:\n" + "\n".join(stale)


def test_every_public_function_of_the_required_modules_has_an_entry():
    _, uncovered = cat.coverage()
    missing = [q for q in uncovered if q.split(".")[0] in cat.REQUIRED_MODULES]
    assert not missing, f"public functions without a bad-input catalogue entry: {missing}"


def test_catalogue_summary(capsys):
    """Prints the figures: functions covered, mutations tried, clear errors, accepted-valid, silent, known issues."""
    everything = list(all_verdicts())
    with capsys.disabled():
        print("\n" + cat.summary(everything))
    assert sum(v.outcome == "clear" for v in everything) > 0.75 * len(everything)
