"""One module per subcommand; imported lazily so that startup stays fast."""
