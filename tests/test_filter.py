"""Hit filters: every operator, precedence, value kinds, failed fetches, and errors with their columns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probed.errors import FilterSyntaxError
from probed.lang.fetch import Unfetched
from probed.lang.filter import MAX_NESTING, parse_filter

FIELDS = ["dfd", "name", "ok", "n", "flags", "bytes", "caller"]
HIT = {
    "dfd": -100, "name": "/etc/hostname", "ok": 1, "n": 16, "flags": "0x8241", "bytes": [1, 2, 3, 4],
    "caller": "do_sys_open+0x1c",
}
FAULT = Unfetched("<fault reading 0x0: E14>")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("dfd == -100", True),
        ("dfd != -100", False),
        ("n < 17", True),
        ("n < 16", False),
        ("n <= 16", True),
        ("n > 15", True),
        ("n > 16", False),
        ("n >= 16", True),
        ("n == 0x10", True),
        ("n==16&&dfd==-100", True),
        ("flags == 0x8241", True),
        ("flags > 0x8000", True),
        ("flags == 33345", True),
        ('flags == "0x8241"', True),
        ('name == "/etc/hostname"', True),
        ('name != "/etc/hostname"', False),
        ('name < "/f"', True),
        ('name ~ "/etc/*"', True),
        ('name ~ "/tmp/*"', False),
        ('name ~ "*host?ame"', True),
        ('caller ~ "do_sys_open+*"', True),
        ("name == 5", False),
        ("name != 5", True),
        ("name < 5", False),
        ("bytes == 1", False),
        ("bytes != 1", True),
        ("ok", True),
        ("!ok", False),
        ("!!ok", True),
        ("name", True),
        ("flags", True),
        ("ok && n == 16", True),
        ("!ok || n == 16", True),
        ("!ok || n == 15", False),
        # && binds tighter than ||.
        ("n == 15 && ok || dfd == -100", True),
        ("n == 15 && (ok || dfd == -100)", False),
        ("dfd == -100 || n == 15 && ok", True),
        ("(dfd == -100 || n == 15) && !ok", False),
        ("!(n == 15)", True),
        ("-100 == dfd", True),
        ("16 <= n", True),
    ],
)
def test_operators_and_precedence(expr, expected):
    assert parse_filter(expr, FIELDS).matches(HIT) is expected


def test_zero_and_empty_values_are_false():
    f = parse_filter("ok", ["ok"])
    assert not f.matches({"ok": 0})
    assert not f.matches({"ok": "0x0"})
    assert not f.matches({"ok": ""})
    assert f.matches({"ok": "0x1"})


def test_a_failed_fetch_makes_comparisons_false():
    values = {**HIT, "name": FAULT}
    assert not parse_filter('name ~ "/etc/*"', FIELDS).matches(values)
    assert not parse_filter('name == "x"', FIELDS).matches(values)
    assert not parse_filter('name != "x"', FIELDS).matches(values)
    assert not parse_filter("name", FIELDS).matches(values)
    assert parse_filter("!name", FIELDS).matches(values)
    assert parse_filter('name == "x" || ok', FIELDS).matches(values)
    assert not parse_filter("n == 16", FIELDS).matches({"dfd": 1})


def test_a_missing_register_is_unknown_not_a_string():
    # A register the target's block lacks is fetched as `<no register X>`; it was compared as that string.
    values = {**HIT, "name": Unfetched("<no register fs_base>")}
    assert not parse_filter('name ~ "<no register*"', FIELDS).matches(values)
    assert not parse_filter('name != "x"', FIELDS).matches(values)
    assert not parse_filter("name", FIELDS).matches(values)
    f = parse_filter('dfd == -100 && name == "x"', FIELDS)
    assert f.fields == ("dfd", "name")
    assert f.unknown_fields(values) == [("name", "<no register fs_base>")]
    assert f.unknown_fields(HIT) == []


def test_string_escapes():
    f = parse_filter(r'name == "a\"b\\c\n\t"', ["name"])
    assert f.matches({"name": 'a"b\\c\n\t'})
    assert parse_filter('name ~ "é*"', ["name"]).matches({"name": "été"})


@pytest.mark.parametrize(
    ("expr", "column", "reason"),
    [
        ("dfd == ", 8, "unexpected end"),
        ("nope > 1", 1, "unknown field 'nope'"),
        ("dfd == 1 $", 10, "unexpected '$'"),
        ("dfd == 1 dfd", 10, "expected &&, || or the end"),
        ("(dfd == 1", 10, "expected )"),
        ("dfd == 1)", 9, "unexpected ')'"),
        ("dfd = 1", 5, "unexpected '='"),
        ("dfd & 1", 5, "unexpected '&'"),
        ("dfd ~ 3", 5, "~ needs a glob string"),
        ("dfd ~ name", 5, "~ needs a glob string"),
        ("3", 2, "expected a comparison operator"),
        ('"x" && dfd', 5, "expected a comparison operator"),
        ("dfd == &&", 8, "unexpected '&&'"),
        ("", 1, "unexpected end"),
        ("!", 2, "unexpected end"),
        ('name == "abc', 9, "unterminated string"),
        (r'name == "a\qb"', 11, "unknown escape"),
        ("  n == 1 || ", 13, "unexpected end"),
    ],
)
def test_syntax_errors_name_the_column(expr, column, reason):
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(expr, ["dfd", "name", "n"])
    assert (info.value.column, info.value.text) == (column, expr)
    assert reason in info.value.reason
    caret_line = str(info.value).splitlines()[-1]
    assert caret_line == "  " + " " * (column - 1) + "^"


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(FilterSyntaxError, match=r"fields: dfd, name"):
        parse_filter("nmae", ["name", "dfd"])


@given(st.text(max_size=40))
def test_garbage_only_ever_raises_filter_syntax_errors(text):
    try:
        f = parse_filter(text, FIELDS)
    except FilterSyntaxError:
        return
    assert f.matches(HIT) in (True, False)


@given(st.text(alphabet='dfnameok 0x19-"\\*=!<>~&|()', max_size=30))
def test_near_grammatical_garbage_parses_or_fails_cleanly(text):
    try:
        f = parse_filter(text, FIELDS)
    except FilterSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1
        return
    assert f.matches(HIT) in (True, False)
    assert f.matches({k: FAULT for k in FIELDS}) in (True, False)


# -- depth (issue 10.6): deep input is a clear error with its column, never a RecursionError ------------------


def test_ten_thousand_nested_parentheses_are_refused_at_the_first_too_deep():
    expr = "(" * 10_000 + "n" + ")" * 10_000
    with pytest.raises(FilterSyntaxError) as info:
        parse_filter(expr, FIELDS)
    assert info.value.column == MAX_NESTING + 1
    assert f"parentheses nested more than {MAX_NESTING} deep" in info.value.reason
    ok = "(" * MAX_NESTING + "n == 3" + ")" * MAX_NESTING
    assert parse_filter(ok, FIELDS).matches(HIT) is (HIT["n"] == 3)


@pytest.mark.parametrize("count", [20_000, 20_001])
def test_twenty_thousand_negations_fold(count):
    f = parse_filter("!" * count + "n == 3", FIELDS)
    assert f.matches(HIT) is ((HIT["n"] == 3) == (count % 2 == 0))


def test_fifty_thousand_conjunctions_evaluate_flat():
    f = parse_filter(" && ".join(["n == 3"] * 50_000) + " || dfd == 0", FIELDS)
    assert f.matches(HIT) is (HIT["n"] == 3 or HIT["dfd"] == 0)


@given(st.lists(st.sampled_from(["(", ")", "!", "n", " == 3", " && ", " || "]), max_size=3000))
def test_long_nesting_garbage_never_recurses_out(parts):
    text = "".join(parts)
    try:
        f = parse_filter(text, FIELDS)
    except FilterSyntaxError as exc:
        assert 1 <= exc.column <= len(text) + 1
        return
    assert f.matches(HIT) in (True, False)
