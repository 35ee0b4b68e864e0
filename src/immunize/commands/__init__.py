"""One module per `immunize` subcommand: each has ``HELP`` and ``main(argv) -> int``."""
