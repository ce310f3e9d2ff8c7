"""Theory apart from runtime code: the lower bounds and the hard instance they are tight on."""
