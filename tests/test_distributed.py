"""``immunize.distributed`` in one process (the multi-process behaviour: tests/distributed)."""

from types import SimpleNamespace

import pytest

from immunize import distributed
from immunize.errors import ImmunizeError


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_helpers_are_the_plain_calls():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.share(lambda items: [i * 2 for i in items], [1, 2, 3], block=2) == [2, 4, 6]
    assert distributed.on_main(lambda: "x") == "x" and distributed.from_main({"a": 1}) == {"a": 1}
    with distributed.local_main_first():
        distributed.wait()


def test_errors_of_on_main_reach_the_caller():
    def fails():
        raise ImmunizeError("broken")

    with pytest.raises(ImmunizeError, match="broken"):
        distributed.on_main(fails)


def test_rank_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.is_distributed() and not distributed.is_main()
    assert (distributed.rank(), distributed.local_rank()) == (3, 1)


def test_a_plain_model_is_not_sharded():
    from immunize.testing import tiny_model

    assert not distributed.is_sharded(tiny_model())


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_saving_from_the_main_process_alone_is_refused_when_sharded(flag):
    with pytest.raises(ImmunizeError, match=r"--curve_save_models: .*FSDP or ZeRO-3"):
        distributed.refuse_sharded_save(SimpleNamespace(**{flag: True}), "--curve_save_models")
    distributed.refuse_sharded_save(SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False), "--x")
