"""`immunize align`: safety SFT (refusals + benign answers) to build an aligned base model."""

from __future__ import annotations

HELP = "safety-align a model (refusals on harmful prompts + benign answers) into an aligned base"


def main(argv: list[str]) -> int:
    from immunize.alignment import AlignConfig, align
    from immunize.config import parse_config

    (cfg,) = parse_config([AlignConfig], argv, prog="immunize align", description=HELP)
    record = align(cfg)
    print(f"aligned model: {cfg.output_dir} ({record.get('steps', '?')} steps, "
          f"train loss {record.get('train_loss', float('nan')):.4f})")
    return 0
