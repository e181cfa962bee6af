#!/usr/bin/env python3
"""Replaces one benchmark script's section of BENCHMARKS.md.

usage: update-section.py NAME MARKDOWN SECTION_FILE

SECTION_FILE holds the whole section, from `<!-- NAME:begin -->` to
`<!-- NAME:end -->`. In MARKDOWN the text between those markers is
replaced; without them the section is appended (the file is created with a
title if missing). Every other section is left as it is.
"""
import os
import re
import sys

name, md, section = sys.argv[1], sys.argv[2], sys.argv[3]
sec = open(section).read().rstrip("\n")
begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
text = open(md).read() if os.path.exists(md) else "# Benchmarks\n"
if begin in text and end not in text:
    sys.exit(f"{md} has {begin} but no {end}")
pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
if pat.search(text):
    text = pat.sub(lambda _: sec, text)
else:
    text = text.rstrip("\n") + "\n\n" + sec + "\n"
tmp = f"{md}.tmp.{os.getpid()}"
open(tmp, "w").write(text)
os.replace(tmp, md)
