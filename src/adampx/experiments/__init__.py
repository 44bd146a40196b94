"""The reproduction of the paper's claims (``adampx reproduce``)."""
