"""Which process of a launched job does what: the one module that knows about ranks.

``accelerate launch`` (or ``torchrun``) starts one process per device, each running the same
command. Training runs on every rank: the Trainer and accelerate place the model (DDP, FSDP2,
DeepSpeed) and keep the ranks in step. Everything else happens once:

- files (identity, provenance, stage markers, evaluation results, ``results.json``, the report)
  are written by the main process (global rank 0), which also holds the run-directory lock;
  the others wait for it (``wait``) before reading what it wrote;
- machine-local caches (the converted GGUF model, trained judges, task files) are built by each
  machine's first process while the others wait (``local_main_first``), then reused by them;
- a decision read from a file (a finished stage, a complete run, a stored result) is the main
  process's, sent to the others, so all ranks take the same path even when their machines see
  different files;
- work that is not training but costs time (evaluation generation and judging) is shared out:
  ``share`` gives each rank a contiguous part, runs it there, and gathers the parts back in the
  original order, so every rank ends with the whole, single-process result;
- work that must not run on several ranks at once (lm-evaluation-harness, perplexity) runs on the
  main process alone (``on_main``) and its result is sent to the others.

Outside a launched job (``WORLD_SIZE`` unset or 1) every helper is the plain single-process
behaviour and nothing initialises a process group. Built on accelerate's ``PartialState`` (the
state the Trainer's own ``Accelerator`` shares): ``main_process_first``, ``wait_for_everyone``,
``split_between_processes`` and ``gather_object``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from immunize.errors import ImmunizeError

T = TypeVar("T")
R = TypeVar("R")


def world_size() -> int:
    """Processes in this job (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def is_distributed() -> bool:
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK") or 0)


def is_main() -> bool:
    """The job's main process (global rank 0); a lone process is its own main."""
    return rank() == 0


def use_cpu_when_no_gpu() -> None:
    """In a launched job on machines without GPUs, make every accelerate state a CPU one.

    accelerate forms a multi-process CPU state (gloo) only when asked for the CPU: asked without,
    a process of ``torchrun`` on a CPU machine would see no distributed job at all and train and
    write alone. ``accelerate launch --cpu`` sets ``ACCELERATE_USE_CPU``; this sets it too for
    ``torchrun`` (or a launcher without ``--cpu``), so the Trainer's state and ours agree."""
    if is_distributed() and "ACCELERATE_USE_CPU" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are spread over the ranks (FSDP or DeepSpeed ZeRO-3): its
    forward then needs every rank, in step, so no rank may generate alone or stop early."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    fsdp = (FSDPModule, FullyShardedDataParallel)
    # FSDP wraps modules (the root, each decoder layer); ZeRO-3 tags each partitioned parameter.
    return any(isinstance(m, fsdp) for m in model.modules()) or any(hasattr(p, "ds_id") for p in model.parameters())


def refuse_sharded_save(trainer, option: str) -> None:
    """Fail on every rank, before training, when ``option`` would save from a sharded model on the
    main process alone (a sharded model's weights are gathered by every rank together)."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise ImmunizeError(f"{option}: saves from the main process alone, which a model sharded by FSDP or "
                            "ZeRO-3 cannot do; launch it with configs/accelerate/ddp.yaml")


def _state():
    from accelerate import PartialState

    # The Trainer's TrainingArguments re-create this shared state with their ``use_cpu``; created
    # here first, it follows the same switch.
    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"))


def wait() -> None:
    """Every rank reaches this point before any goes on (no-op in a single process)."""
    if is_distributed():
        _state().wait_for_everyone()


@contextmanager
def local_main_first() -> Iterator[None]:
    """This machine's first process runs the block first (it builds the cache), then the others."""
    if not is_distributed():
        yield
        return
    with _state().local_main_process_first():
        yield


def _gather(value: Any) -> list[Any]:
    from accelerate.utils import gather_object

    return gather_object([value])


def _checked(parts: list[tuple[str | None, Any]]) -> list[Any]:
    """The ranks' results, or the first rank's error raised on every rank (none is left waiting)."""
    for index, (error, _) in enumerate(parts):
        if error is not None:
            raise ImmunizeError(f"rank {index}: {error}")
    return [value for _, value in parts]


def _attempt(fn: Callable[..., R], *args) -> tuple[str | None, R | None]:
    try:
        return None, fn(*args)
    except ImmunizeError as err:
        return str(err), None
    except Exception as err:  # any failure must reach the other ranks, or they wait forever
        return f"{type(err).__name__}: {err}", None


def on_main(fn: Callable[[], R]) -> R:
    """``fn()`` on the main process only; every rank returns its result (or raises its error)."""
    if not is_distributed():
        return fn()
    outcome = _attempt(fn) if is_main() else (None, None)
    return _checked(_gather(outcome))[0]


def from_main(value: T) -> T:
    """The main process's ``value`` on every rank (so all ranks go on with the same record)."""
    if not is_distributed():
        return value
    return _gather(value if is_main() else None)[0]


def share(fn: Callable[[list[T]], list[R]], items: Sequence[T], *, block: int = 1) -> list[R]:
    """``fn(items)`` computed by all ranks together: rank r takes a contiguous part, whole
    ``block``-sized groups (a generation batch) at a time; the parts come back in order.

    ``fn`` maps a list to a list of the same length. With ``block`` set to the batch size of a
    computation that batches its input in order, each rank forms exactly the batches a single
    process forms, so the result is the single-process one.
    """
    if not is_distributed():
        return fn(list(items))
    blocks = [list(items[i:i + block]) for i in range(0, len(items), block)]
    with _state().split_between_processes(blocks) as mine:
        own = [item for part in mine for item in part]
        outcome = _attempt(fn, own) if own else (None, [])
    # ``split_between_processes`` gives ranks contiguous, ordered parts: concatenating them in rank
    # order restores the input order.
    parts = _checked(_gather(outcome))
    out = [value for part in parts for value in part]
    if len(out) != len(items):
        raise ImmunizeError(f"sharing {len(items)} items across {world_size()} ranks returned {len(out)}")
    return out
