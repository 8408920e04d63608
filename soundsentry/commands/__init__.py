"""The `soundsentry` command's subcommands, one module per group; `soundsentry.cli` parses
the command line and hands over to them."""
