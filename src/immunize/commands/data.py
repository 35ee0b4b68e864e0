"""`immunize data`: inventory of the data root; validates every file row by row."""

from __future__ import annotations

from dataclasses import dataclass, field

from immunize.config import parse_config

HELP = "inventory and validate the data root (rows, licence); non-zero exit on a malformed file"


@dataclass
class DataConfig:
    data_root: str | None = field(default=None, metadata={"help": "data root (default $IMMUNIZE_DATA, ../shared/data)"})
    verify_checksums: bool = field(default=True, metadata={"help": "compare files with MANIFEST.json sha256"})
    splits: bool = field(default=True, metadata={"help": "also print the BeaverTails split sizes"})


def main(argv: list[str]) -> int:
    (cfg,) = parse_config([DataConfig], argv, prog="immunize data", description=HELP)
    from immunize.data.inventory import grouped, inventory
    from immunize.paths import data_root

    root = data_root(cfg.data_root)
    reports = inventory(root, verify_checksums=cfg.verify_checksums)
    print(f"data root: {root}\n")
    rows = grouped(reports)
    width = max(len(r[0]) for r in rows)
    print(f"{'dataset':<{width}}  {'rows':>7}  {'status':<6}  licence")
    for path, n, licence, status in rows:
        print(f"{path:<{width}}  {n if n is not None else '-':>7}  {status if status == 'ok' else 'BAD':<6}  {licence}")
    bad = [r for r in reports if not r.ok]
    changed = [r for r in reports if r.ok and r.message]
    for r in changed:
        print(f"warning: {r.path}: {r.message}")
    for r in bad:
        print(f"error: {r.message}")
    if bad:
        return 1
    if cfg.splits:
        from immunize.data import RefusalBank, load_splits

        splits = load_splits(root=root)
        print(f"\nBeaverTails splits (hash of normalized prompt): defence {len(splits.defence)} rows / "
              f"{len(splits.prompts('defence'))} prompts, attack {len(splits.attack)} / "
              f"{len(splits.prompts('attack'))}, held-out {len(splits.heldout)}, evaluation prompts "
              f"{len(splits.eval)}; dropped {splits.dropped}")
        print(f"refusal bank (only with --refusals bank or --refusal_fallback bank): "
              f"{len(RefusalBank.from_data(root))} distinct human-written refusals of unsafe requests")
    return 0
