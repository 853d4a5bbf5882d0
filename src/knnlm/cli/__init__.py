"""The `knnlm` command line: `knnlm.cli.main` builds the parser; one module a group of subcommands."""
