"""The ``basicsr`` commands (prepare, train, test, infer, export, bench), apart from the library: the library never
imports from here."""
