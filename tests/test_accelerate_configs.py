"""The accelerate launch configs in configs/accelerate/ and the SLURM example, read the way accelerate
reads them (nothing trains, nothing is launched, no network).

- every ``configs/accelerate/*.yaml`` begins with its exact launch command; the command is parsed by
  the parser of the ``accelerate`` console script and run through accelerate's own ``launch_command``
  up to the point where it would start processes (the launchers are replaced by recorders), so the
  file is loaded by accelerate's loader and the environment of each launched process is the one
  ``accelerate launch`` would build (``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env``);
- every nested key of a config is an option of ``accelerate launch`` (accelerate copies unknown
  ``fsdp_config`` / ``deepspeed_config`` keys onto its arguments and never reads them: a misspelt
  key would be ignored silently);
- fsdp2.yaml: the ``FullyShardedDataParallelPlugin`` built from that environment is FSDP2,
  transformer-layer wrap of ``LlamaDecoderLayer``, full state dict, full shard, no RAM-efficient
  loading, no FSDP activation checkpointing; sharding a tiny tied Llama with it (one gloo process,
  accelerate's ``fsdp2_prepare_model``) gives one unit per decoder layer and one unit holding the
  final norm, the LM head and the tied embedding; tests/distributed uses the same ``FSDP_*`` values;
- zero3.yaml: the ``DeepSpeedPlugin`` built from its environment is ZeRO-3 with the 16-bit save,
  ``zero.Init``, no offload, accumulation and clipping left to the Trainer (DeepSpeed itself is not
  needed for this);
- slurm_multinode.sbatch passes ``bash -n`` and, run with stand-ins for srun, scontrol and
  accelerate, starts one ``accelerate launch`` per node whose arguments give each node its own
  machine rank, the first node as the meeting point, and all nodes' GPUs in the process count.
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SBATCH = CONFIG_DIR / "slurm_multinode.sbatch"


def _header_words(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# accelerate launch "), f"{path.name}: first line {first!r} is not its launch command"
    return shlex.split(first[2:])


def _cli_parser():
    """The parser of the ``accelerate`` console script (accelerate.commands.accelerate_cli.main)."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.commands.utils import CustomArgumentParser

    parser = CustomArgumentParser("Accelerate CLI tool", usage="accelerate <command> [<args>]", allow_abbrev=False)
    launch_command_parser(subparsers=parser.add_subparsers())
    return parser


def _launch(words: list[str], monkeypatch) -> tuple[object, dict[str, str], str]:
    """Run ``accelerate <words>`` up to the process start; return the arguments, the environment the
    launched processes would get, and which launcher accelerate chose."""
    import accelerate.commands.launch as launch
    import accelerate.utils.launch as launch_utils
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    assert words[0] == "accelerate", words
    monkeypatch.chdir(REPO)  # the commands name the files relative to the repository root
    monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port=None: False)  # other jobs may hold 29500
    chosen: dict[str, object] = {}
    for name in ("multi_gpu_launcher", "deepspeed_launcher", "simple_launcher", "tpu_launcher"):
        monkeypatch.setattr(launch, name, lambda args, name=name: chosen.update(name=name, args=args))
    args = _cli_parser().parse_args(words[1:])
    args.func(args)
    assert chosen, f"{words}: accelerate chose no launcher"
    args = chosen["args"]
    if chosen["name"] == "deepspeed_launcher":
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env, chosen["name"]


def _apply(env: dict[str, str], monkeypatch) -> None:
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        if key not in env:
            monkeypatch.delenv(key, raising=False)


def test_the_configs_are_there():
    assert {p.name for p in CONFIGS} >= {"ddp.yaml", "fsdp2.yaml", "zero3.yaml"}
    assert SBATCH.is_file()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_itself(path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig), f"{path.name}: loaded as {type(config).__name__}"
    assert config.num_machines == 1 and config.num_processes == 8 and config.mixed_precision == "bf16"
    words = _header_words(path)
    assert words[:4] == ["accelerate", "launch", "--config_file", f"configs/accelerate/{path.name}"], (
        f"{path.name}: its launch command names {words[:4]}")
    assert words[4:6] == ["-m", "immunize"], f"{path.name}: the command must run `-m immunize`: {words}"
    if "--config" in words:
        recipe = words[words.index("--config") + 1]
        assert (REPO / recipe).is_file(), f"{path.name}: its command names {recipe}, which does not exist"
    args, env, _ = _launch(words, monkeypatch)
    assert args.module is True and args.training_script == "immunize", (args.module, args.training_script)
    assert args.num_processes == 8 and args.nproc_per_node == "8"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_nested_key_is_a_launch_option(path):
    import yaml
    from accelerate.commands.launch import launch_command_parser

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    dests = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in data.get(section) or {}:
            name = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert name in dests, f"{path.name}: {section}.{key} is no option of accelerate launch (ignored)"


def test_ddp_environment(monkeypatch):
    _, env, launcher = _launch(_header_words(CONFIG_DIR / "ddp.yaml"), monkeypatch)
    assert launcher == "multi_gpu_launcher"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env


def _fsdp2_env(monkeypatch) -> dict[str, str]:
    _, env, launcher = _launch(_header_words(CONFIG_DIR / "fsdp2.yaml"), monkeypatch)
    assert launcher == "multi_gpu_launcher"
    return env


def test_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env = _fsdp2_env(monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    _apply(env, monkeypatch)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy  # TRANSFORMER_BASED_WRAP
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False


def test_fsdp2_units_of_a_tied_llama(monkeypatch):
    """accelerate's own FSDP2 preparation with the plugin of fsdp2.yaml, on one gloo process."""
    import types

    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    _apply(_fsdp2_env(monkeypatch), monkeypatch)
    config = CONFIG_MAPPING["llama"](hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=8, vocab_size=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2's are
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plugin = FullyShardedDataParallelPlugin()
        accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                            is_main_process=True, device=torch.device("cpu"), torch_device_mesh=None)
        model = fsdp2_prepare_model(accelerator, model)
        groups: dict[int, list[str]] = {}
        for name, module in model.named_modules():
            if isinstance(module, FSDPModule):
                group = module._get_fsdp_state()._fsdp_param_group
                groups.setdefault(id(group) if group is not None else id(module), []).append(name or "<root>")
    finally:
        dist.destroy_process_group()
    units = sorted(" + ".join(sorted(names)) for names in groups.values())
    assert units == ["<root>", "lm_head + model.embed_tokens + model.norm", "model.layers.0", "model.layers.1"], units


def test_fsdp2_matches_the_distributed_tests(monkeypatch):
    """tests/distributed/test_parity.py stands in for `accelerate launch` with its FSDP2_ENV."""
    source = REPO / "tests" / "distributed" / "test_parity.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    found = [node.value for node in tree.body if isinstance(node, ast.Assign)
             and any(getattr(t, "id", None) == "FSDP2_ENV" for t in node.targets)]
    if not found:
        pytest.skip("tests/distributed/test_parity.py defines no FSDP2_ENV")
    stand_in = ast.literal_eval(found[0])
    env = _fsdp2_env(monkeypatch)
    launched = {k: v for k, v in stand_in.items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    assert launched, stand_in
    assert {k: env.get(k) for k in launched} == launched


def test_zero3_plugin(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env, launcher = _launch(_header_words(CONFIG_DIR / "zero3.yaml"), monkeypatch)
    assert launcher == "deepspeed_launcher"
    assert args.deepspeed_multinode_launcher == "standard"
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    _apply(env, monkeypatch)
    plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage"] == 3
    assert plugin.zero3_save_16bit_model is True and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.zero3_init_flag is True
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    ds = plugin.deepspeed_config
    assert plugin.gradient_accumulation_steps == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert plugin.gradient_clipping == "auto" and ds["gradient_clipping"] == "auto"
    assert ds["train_micro_batch_size_per_gpu"] == "auto"


def test_sbatch_syntax_and_header():
    text = SBATCH.read_text(encoding="utf-8").splitlines()
    assert text[0] == "#!/bin/bash", "sbatch needs the interpreter line first"
    assert text[1] == "# sbatch configs/accelerate/slurm_multinode.sbatch", text[1]
    assert any(line.startswith("#SBATCH --nodes=") for line in text)
    assert any(line.startswith("#SBATCH --ntasks-per-node=1") for line in text)
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


STAND_INS = {
    # srun: drop its options, then run the task once per node with that node's SLURM_NODEID
    "srun": '#!/bin/bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\n'
            'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done\n',
    "scontrol": '#!/bin/bash\n[[ "$*" == "show hostnames node[1-2]" ]] || exit 3\nprintf "node1\\nnode2\\n"\n',
    # accelerate: record its arguments (NUL-separated) per node
    "accelerate": '#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORD.$SLURM_NODEID"\n',
}


def test_sbatch_starts_one_launch_per_node(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(body, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("", encoding="utf-8")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(submit),
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "32",
           "RECORD": str(tmp_path / "launch")}
    result = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in (0, 1):
        record = tmp_path / f"launch.{node}"
        assert record.is_file(), f"node {node}: no accelerate launch"
        words = ["accelerate", *record.read_text(encoding="utf-8").split("\0")[:-1]]
        assert words[1] == "launch", words
        assert words[words.index("-m") + 1:] == ["immunize", "run", "--config", "recipes/paper_table1.yaml"], words
        args, launched, launcher = _launch(words, monkeypatch)
        assert args.config_file == "configs/accelerate/fsdp2.yaml"
        assert launcher == "multi_gpu_launcher" and launched["ACCELERATE_USE_FSDP"] == "true"
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, node, 16)
        assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", node, "8")
        assert (args.main_process_ip, args.main_process_port) == ("node1", 29500)
