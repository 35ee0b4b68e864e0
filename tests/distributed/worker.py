"""``immunize`` as a launched worker, with what the distributed tests need to watch or stand in.

Run as ``python -m torch.distributed.run ... worker.py attack ...`` (or plainly, as one process): it
is the real CLI, plus, as the environment asks (a ``+`` argument separates commands run one after
the other in the same processes, to pay for the imports once):

- ``IMMUNIZE_WRITE_LOG``: ``immunize.io.atomic_write_bytes`` (under every atomic JSON, text and
  JSONL write of the project) also appends the path to ``$IMMUNIZE_WRITE_LOG.rank<RANK>``;
- ``IMMUNIZE_TEST_FSDP_ON_CPU=1``: accelerate builds the FSDP plugin from the ``FSDP_*`` variables
  (as ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` sets them) but, on CPU
  processes, then drops it and runs DDP (``AcceleratorState`` only turns FSDP on for GPU-like
  device types). torch's ``fully_shard`` itself trains on CPU over gloo, so here the plugin is put
  back right after the state is made: everything after that is accelerate's and the Trainer's
  own FSDP2 path (``fully_shard`` per decoder layer and root, sharded optimizer state, gathered
  full state dict on save);
- ``IMMUNIZE_TEST_FAKE_JUDGES=1``: the trained judges' names stand for a deterministic length
  judge (``immunize.testing.length_judges``, as in ``tests/test_pipeline.py``), so a tiny
  ``immunize run`` needs no trained judges.
"""

from __future__ import annotations

import contextlib
import os
import sys

import immunize.io

if os.environ.get("IMMUNIZE_WRITE_LOG"):
    _log = f"{os.environ['IMMUNIZE_WRITE_LOG']}.rank{os.environ.get('RANK', '0')}"
    _write = immunize.io.atomic_write_bytes

    def _recorded(path, data):
        with open(_log, "a", encoding="utf-8") as handle:
            handle.write(f"{os.path.abspath(path)}\n")
        return _write(path, data)

    immunize.io.atomic_write_bytes = _recorded

if os.environ.get("IMMUNIZE_TEST_FSDP_ON_CPU") == "1":
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = _fsdp_on_cpu

def _commands(argv: list[str]) -> list[list[str]]:
    commands, current = [], []
    for arg in argv:
        if arg == "+":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    return [*commands, current]


if __name__ == "__main__":
    from immunize.cli import main
    from immunize.testing import length_judges

    with length_judges() if os.environ.get("IMMUNIZE_TEST_FAKE_JUDGES") == "1" else contextlib.nullcontext():
        for command in _commands(sys.argv[1:]):
            if code := main(command):
                sys.exit(code)
