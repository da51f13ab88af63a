"""``kpr bench``: measurements of kpr against the fake API server and real kernel maps."""
