"""`immunize run`: the whole experiment (align → defend → attack → evaluate → explain → report)."""
