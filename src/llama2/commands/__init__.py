"""One module per `llama2` subcommand. Each defines `register(subparsers)` and keeps heavy imports inside
its handler so `llama2 --help` stays fast. Modules named `_*` (`_options`: the sampling flags) are shared
helpers, not subcommands."""
