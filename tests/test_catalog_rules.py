"""Catalog rules (sans-I/O): version normalisation, matching precedence, and every way a rule file is refused."""

import pytest

from quanta.catalog import Matcher, RawEntry, RuleFileError, normalize_version, parse_rule_file
from quanta.catalog.store import seed_bytes


@pytest.mark.parametrize("raw,expected", [
    ("1:3.0.11-1~deb12u2", "3.0.11"),
    ("3.0.7-27.el9", "3.0.7"),
    ("2.40.1+dfsg-1", "2.40.1"),
    ("5.2.15(1)-release", "5.2.15"),
    ("1.0.2k-fips", "1.0.2k"),
    ("v1.4", "1.4"),
    ("120.0.6099.130", "120.0.6099.130"),
    ("  7  ", "7"),
    ("latest", "latest"),
    ("", ""),
])
def test_version_normalisation(raw, expected):
    assert normalize_version(raw) == expected


HEAD = 'format = 1\nname = "t"\nversion = "1"\n'


def rules(*bodies: str) -> bytes:
    return (HEAD + "".join(f"\n[[rule]]\n{b}\n" for b in bodies)).encode()


def rule(id, match, title, product, priority=0, publisher=None, extra=""):
    pub = f"publisher = '{publisher}'\n" if publisher else ""
    return (f"id = '{id}'\nmatch = '{match}'\ntitle = '{title}'\n{pub}vendor = 'V'\nproduct = '{product}'\n"
            f"category = 'C'\npriority = {priority}\n{extra}")


def test_priority_then_exact_then_file_order():
    rf = parse_rule_file(rules(rule("r1", "regex", "foo.*", "Regex low", 1),
                               rule("r2", "regex", "foo-bar", "Regex high", 5),
                               rule("e1", "exact", "FOO-BAR", "Exact", 5),
                               rule("r3", "regex", "baz.*", "First"),
                               rule("r4", "regex", "baz.*", "Second")))
    m = Matcher(rf.rule)
    assert m.normalize(RawEntry("", "foo-bar", "1")).product == "Exact"  # tie at 5: exact beats regex
    assert m.normalize(RawEntry("", "foo-x", "1")).product == "Regex low"
    assert m.normalize(RawEntry("", "bazooka", "1")).product == "First"  # tie: earlier rule wins
    n = m.normalize(RawEntry("", "nothing", "1:2.0-1"))
    assert (n.matched, n.product, n.version) == (False, None, "2.0")


def test_regex_is_a_fullmatch_and_publisher_restricts():
    m = Matcher(parse_rule_file(rules(rule("o", "regex", "office", "Office", publisher="Microsoft.*"))).rule)
    assert m.normalize(RawEntry("Microsoft Corporation", "Office", "16")).matched
    assert not m.normalize(RawEntry("Someone Else", "Office", "16")).matched
    assert not m.normalize(RawEntry("Microsoft", "Office Tools", "16")).matched  # no partial match


def test_version_pattern_group_wins():
    rf = parse_rule_file(rules(rule("j", "regex", "java.*", "Java", extra="version_pattern = 'Update (\\d+)'\n")))
    assert Matcher(rf.rule).normalize(RawEntry("", "Java 8", "8.0 Update 391")).version == "391"


def test_seed_rules_parse_and_normalise_common_packages():
    m = Matcher(parse_rule_file(seed_bytes()).rule)
    n = m.normalize(RawEntry("Debian OpenSSL Team", "openssl", "1:3.0.11-1~deb12u2"))
    assert (n.vendor, n.product, n.version, n.category) == ("OpenSSL Project", "OpenSSL", "3.0.11", "Security")
    assert m.normalize(RawEntry("", "libssl3", "3.0.11-1~deb12u2")).product == "OpenSSL"
    assert m.normalize(RawEntry("", "openssh-server", "1:9.2p1-2+deb12u2")).product == "OpenSSH Server"


def refused(data: bytes) -> RuleFileError:
    with pytest.raises(RuleFileError) as ei:
        parse_rule_file(data)
    return ei.value


def test_toml_syntax_error_names_the_line():
    e = refused(rules(rule("a", "exact", "a", "A")) + b"\n[[rule]]\nid = 'b'\nthis is not toml\n")
    assert e.line == 17 and "TOML syntax" in e.reason
    e = refused(rules(rule("a", "exact", "a", "A")) + b"\n[[rule]]\nid = 'unterminated\n")
    assert e.line == 16 and "TOML syntax" in e.reason


def test_wrong_type_names_the_line_and_key():
    data = rules(rule("a", "exact", "a", "A"), rule("b", "exact", "b", "B").replace("priority = 0", "priority = 'high'"))
    e = refused(data)
    lines = data.decode().splitlines()
    assert lines[e.line - 1].startswith("priority = 'high'")
    assert "rule.1.priority" in e.reason


def test_unknown_key_missing_key_bad_regex_duplicate_id():
    e = refused(rules(rule("a", "exact", "a", "A", extra="colour = 'red'\n")))
    assert "unknown key" in e.reason and "colour" in e.reason and e.line == 13
    e = refused(rules("id = 'a'\nmatch = 'exact'\ntitle = 'a'\nvendor = 'V'\ncategory = 'C'"))
    assert "rule.0.product: missing required key" in e.reason and e.line == 5  # the rule's [[rule]] line
    e = refused(rules(rule("a", "regex", "a(", "A")))
    assert "invalid regular expression" in e.reason and e.line == 5
    e = refused(rules(rule("a", "exact", "a", "A"), rule("a", "exact", "b", "B")))
    assert "duplicate rule id 'a'" in e.reason and e.line == 16  # the second rule's id line
    e = refused(rules(rule("a", "regex", "a", "A", extra="version_pattern = '\\d+'\n")))
    assert "capture group" in e.reason
    e = refused(rules(rule("a", "fuzzy", "a", "A")))
    assert "rule.0.match" in e.reason


def test_header_errors():
    assert "format" in refused(b'format = 2\nname = "t"\nversion = "1"\n').reason
    assert refused(b'format = 1\nversion = "1"\n').reason == "name: missing required key"
    assert "UTF-8" in refused(b'format = 1\nname = "\xff"\n').reason
