"""HTTP API families: each module translates one wire format to and from the engine's types."""
