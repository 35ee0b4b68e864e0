"""`immunize align`: the safety-sft defence with the alignment stage's defaults, to build an aligned base."""

from __future__ import annotations

HELP = "safety-align a model (refusals on harmful prompts + benign answers) into an aligned base"


def main(argv: list[str]) -> int:
    from immunize.alignment import AlignmentConfig, align
    from immunize.config import parse_config
    from immunize.method_runner import is_complete

    (cfg,) = parse_config([AlignmentConfig], argv, prog="immunize align",
                          description=f"{HELP}; options are those of `immunize defend --defence safety-sft`, "
                                      "with the alignment defaults")
    out = align(cfg)
    record = is_complete(out) or {}
    print(f"aligned model: {out} ({record.get('steps', '?')} steps, "
          f"train loss {record.get('train_loss', float('nan')):.4f})")
    return 0
