"""`immunize env`: versions, devices, paths: what to paste into a bug report."""

from __future__ import annotations

from dataclasses import dataclass

from immunize.config import parse_config

HELP = "print versions, devices, data root and cache paths"


@dataclass
class EnvConfig:
    pass


def main(argv: list[str]) -> int:
    parse_config([EnvConfig], argv, prog="immunize env", description=HELP)
    import os

    import torch

    from immunize.config import git_revision, package_versions
    from immunize.models import choose_device, choose_dtype
    from immunize.paths import cache_dir, data_root

    for name, version in package_versions().items():
        print(f"{name:<22} {version or 'not installed'}")
    device = choose_device(None)
    print(f"{'git revision':<22} {git_revision() or 'n/a'}")
    print(f"{'device (auto)':<22} {device} / {choose_dtype(None, device)}")
    print(f"{'cuda':<22} {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else f"{'cuda':<22} no")
    print(f"{'cpu threads':<22} {torch.get_num_threads()}")
    print(f"{'data root':<22} {data_root(must_exist=False)}")
    print(f"{'cache':<22} {cache_dir()}")
    print(f"{'HF_HUB_OFFLINE':<22} {os.environ.get('HF_HUB_OFFLINE', '')}")
    return 0
