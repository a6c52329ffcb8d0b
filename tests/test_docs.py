"""The documentation: what README.md and docs/ promise is checked from here.

- Every relative link of the Markdown files points at a file that exists,
  and at a heading of it when it names an anchor (GitHub's anchors: the
  heading in lower case, punctuation dropped, spaces made hyphens).
- The README starts with its Quickstart, the two commands, and stays short.
- Every Python block of the README and docs/ compiles, and the README's
  tour runs against a real faytd: the share-point block, the notification
  target and sender, the chain server and the SPECIAL client, each in a
  process of its own, as a reader would run them.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
              if f.endswith(".md"))
MARKDOWN = [README, os.path.join(ROOT, "CHANGELOG.md"),
            os.path.join(ROOT, "bench", "RESULTS.md")] + DOCS

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The text outside fenced code blocks."""
    return _FENCE.sub("", text)


def code_blocks(text, lang):
    return [body for info, body in _FENCE.findall(text) if info.strip() == lang]


def anchors(text):
    """GitHub's anchors of a Markdown text's headings (duplicates get -1, -2...)."""
    out, seen = set(), {}
    for h in _HEADING.findall(_prose(text)):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else "%s-%d" % (slug, n))
    return out


def links(text):
    return _LINK.findall(_INLINE_CODE.sub("", _prose(text)))


def _rel(path):
    return os.path.relpath(path, ROOT)


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_docs_relative_links_resolve(path):
    text = _read(path)
    bad = []
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):     # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(dest):
            bad.append("%s: no such file" % target)
        elif anchor and anchor not in anchors(_read(dest)):
            bad.append("%s: no heading with anchor #%s in %s" % (target, anchor, _rel(dest)))
    assert not bad, "%s: %s" % (_rel(path), "; ".join(bad))


def test_docs_every_file_is_reached_from_the_readme():
    """Every page of docs/ is linked from the README or from another page."""
    reached = set()
    for path in MARKDOWN:
        for target in links(_read(path)):
            file_part = target.partition("#")[0]
            if file_part:
                reached.add(os.path.normpath(os.path.join(os.path.dirname(path), file_part)))
    assert not [_rel(p) for p in DOCS if p not in reached]


def test_docs_readme_starts_with_the_quickstart():
    text = _read(README)
    headings = re.findall(r"^## (.+)$", _prose(text), re.M)
    assert headings[0] == "Quickstart"
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert code_blocks(quick, "sh")[0] == "make demo\nmake test\n"
    assert len(text.splitlines()) <= 300
    assert "shared/" not in text        # the spec and DESIGN.md are not in the repository


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_docs_python_blocks_compile(path):
    for i, block in enumerate(code_blocks(_read(path), "python")):
        compile(block, "%s, python block %d" % (_rel(path), i + 1), "exec")


def _tour():
    """The README's tour blocks by what they are: {share, target, sender, pager, client}."""
    blocks = code_blocks(_read(README), "python")
    kinds = {"share": "lp.share_create(", "target": "lp.install_handler(",
             "sender": "lp.notification_channel(", "pager": "lp.chain_join(",
             "client": "lp.SPECIAL"}
    out = {}
    for kind, mark in kinds.items():
        found = [b for b in blocks if mark in b]
        assert len(found) == 1, "the README's tour has %d %s blocks" % (len(found), kind)
        out[kind] = found[0]
    return out


def _script(tmp_path, name, code):
    path = tmp_path / (name + ".py")
    path.write_text(code)
    return str(path)


def _run(args, env):
    r = subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _start(args, env):
    """A background tour process; its first line of output once it is ready."""
    p = subprocess.Popen([sys.executable] + args, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        p.wait(timeout=30)
        raise AssertionError("%s exited early: %s" % (args[0], p.stderr.read()))
    return p, line.strip()


def _stop(p):
    p.terminate()
    try:
        p.wait(timeout=30)
    finally:
        p.stdout.close()
        p.stderr.close()


def test_docs_readme_tour_runs(fresh_faytd, tmp_path):
    tour = _tour()
    d = fresh_faytd()
    env = dict(os.environ, FAYT_SOCKET=d.socket)

    assert _run([_script(tmp_path, "share", tour["share"])], env) == "b'hello'\n"

    target, context_id = _start([_script(tmp_path, "target", tour["target"])], env)
    try:
        assert context_id.isdigit()
        out = _run([_script(tmp_path, "sender", tour["sender"]), context_id], env)
        assert out == "4\n"
    finally:
        _stop(target)

    pager, ready = _start([_script(tmp_path, "pager", tour["pager"])], env)
    try:
        assert ready == "serving"
        out = _run([_script(tmp_path, "client", tour["client"])], env)
        assert out == "b'page 3 of hello'\n"
    finally:
        _stop(pager)

    # The README says what the client prints.
    assert "`b'page 3 of hello'`" in _read(README)
