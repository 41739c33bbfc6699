"""Route rules from a config file: what they accept and refuse."""

from __future__ import annotations

import pytest

from routing.router import route_from_rule


@pytest.mark.parametrize("prefix", ["/static/", "/", "/static", "/a%20b/", "/caf%C3%A9/"])
def test_prefixes_in_normal_form_are_accepted(tmp_path, prefix):
    route = route_from_rule({"to": "docroot", "prefix": prefix, "root": str(tmp_path)}, "route 1", str(tmp_path))
    assert route.prefix == prefix.encode()


@pytest.mark.parametrize("prefix,problem", [
    ("/x/../static/", "empty, '.' or '..' segment"),
    ("//static/", "empty, '.' or '..' segment"),
    ("/./static/", "empty, '.' or '..' segment"),
    ("/%73tatic/", "has %73 (write 's' itself)"),
    ("/a%2fb/", "which a request path may not contain"),
    ("/a%c3%a9/", "upper-case hex"),
])
def test_prefixes_that_could_never_match_are_refused(tmp_path, prefix, problem):
    """Requests are matched on their normalised path (dot segments resolved, escapes of
    unreserved characters decoded), so a prefix written otherwise would silently never apply."""
    with pytest.raises(ValueError) as info:
        route_from_rule({"to": "docroot", "prefix": prefix, "root": str(tmp_path)}, "route 1", str(tmp_path))
    assert str(info.value).startswith(f"route 1: prefix {prefix!r}") and problem in str(info.value)
