"""``immunize`` as a launched worker that records which files this rank writes.

Run as ``python -m torch.distributed.run ... record_writes.py attack ...`` (or plainly, as one
process): it is the real CLI, with ``immunize.io.atomic_write_bytes`` (under every atomic JSON, text
and JSONL write of the project) also appending the path to ``$IMMUNIZE_WRITE_LOG.rank<RANK>``.
"""

from __future__ import annotations

import os
import sys

import immunize.io

_log = f"{os.environ['IMMUNIZE_WRITE_LOG']}.rank{os.environ.get('RANK', '0')}"
_write = immunize.io.atomic_write_bytes


def _recorded(path, data):
    with open(_log, "a", encoding="utf-8") as handle:
        handle.write(f"{os.path.abspath(path)}\n")
    return _write(path, data)


immunize.io.atomic_write_bytes = _recorded

if __name__ == "__main__":
    from immunize.cli import main

    sys.exit(main(sys.argv[1:]))
