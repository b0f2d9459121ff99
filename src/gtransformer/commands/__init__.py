"""One module per `gtransformer` subcommand: argument parsing, then a call into the library."""
